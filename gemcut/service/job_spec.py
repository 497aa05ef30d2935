"""A fine-tuning job request (OpenAI's `POST /v1/fine_tuning/jobs` body) -> a validated gemcut run config.

    python -m pytest -q tests/test_service_job_spec.py
    python -c "from gemcut.service.job_spec import job_spec; print(job_spec({'model': 'm', 'training_file': 'file-x', \
'method': {'type': 'supervised'}}, base_model_source='smollm2-135m-instruct', training_kind='messages', \
validation=False, seed_default=7).method)"

`job_spec` answers the job's `method` (with every "auto" replaced by the number chosen), the legacy top-level
`hyperparameters`, the `RunConfig` as a dict and the seed; anything wrong raises `JobSpecError(message,
param)`, `param` naming the request field to fix (OpenAI's error shape). The worker fills in the data paths
(`data.train`, `data.validation`) and the run folder (`output`); nothing here touches the file system.

Methods -> gemcut objectives (gemcut/tasks.py):
- supervised: `causal_lm` (SFT on messages and prompt_completion; continued pretraining on text; label
  records as a generative classifier, as the quickstart trains them, with a neutral `data.instruction`),
  or `classify` when `extra_body.gemcut` says `objective.kind: classify`. The deprecated top-level
  `hyperparameters` means supervised.
- dpo: `dpo` (beta -> objective.dpo.beta) on preference records.
- reinforcement: `grpo` with the request's grader as `objective.rl.grader`, and `data.extra_fields: keep` so
  each row's extra fields reach the grader as `{{item.x}}`.

What "auto" picks, and why:
- n_epochs: 3, OpenAI's own default; when the caller passes the number of training records, OpenAI's
  published rule (its fine-tuning data-preparation cookbook) stretches it so that at least 100 examples
  are seen (at most 25 epochs) and shrinks it so that at most 25,000 are (at least 1). Reinforcement: 1
  (each prompt is already sampled group_size times a pass, and rollouts are the expensive part on a CPU).
- batch_size: 8 examples a step, gemcut's default global batch (4 prompts for reinforcement, as
  examples/grpo_sentiment.yaml), never more than the number of training records when that is known.
- learning_rate_multiplier: 1.0 of gemcut's own learning rate for the objective and the adapter
  (`base_learning_rate`): 2e-4 for LoRA (TrainConfig's default and examples/sft_chatterbot.yaml,
  dpo_chatterbot.yaml), 5e-4 for LoRA GRPO (examples/grpo_sentiment.yaml), 2e-5 for a causal LM trained
  whole (every weight moves: a tenth of LoRA's rate), 1e-4 for a classifier trained whole
  (presets/quickstart_classify.yaml). A gemcut `train.lr` override replaces the base, and the answered
  multiplier is then train.lr over gemcut's rate.
- beta: 0.1, gemcut's and the DPO paper's usual value (objective.dpo.beta).
- reinforcement: compute_multiplier 1.0 = objective.rl.group_size 4 (completions sampled per prompt: the
  exploration the multiplier buys; c -> round(4c), at least 2); eval_interval = the service's evaluation
  interval (below); eval_samples = train.val_max_examples 24 (the validation prompts sampled at each
  evaluation, as examples/grpo_sentiment.yaml); reasoning_effort "default" (gemcut's models have no other:
  low/medium/high are refused).

Set for every job: LoRA (gemcut's default adapter, what the presets train with on a CPU), `data.format:
jsonl` (uploads are stored without a suffix), `data.kind` = the kind the upload check found, and resumable
checkpoints: `train.save_every` 10 steps for LoRA (a checkpoint is the adapter and its optimizer state,
megabytes: a worker that dies or a pause loses at most 10 steps), 25 for weights trained whole (a
checkpoint is the model and two Adam moments, so saving costs more), `train.keep_last_n` 3. With a
validation file, validation runs every second checkpoint (`train.eval_every`) on at most 100 examples
(`train.val_max_examples`), so the job's events carry valid_loss while it runs; without one, at the end.

`extra_body.gemcut` (the request's top-level `gemcut` object) holds run-config overrides, nested or dotted,
applied last and validated by `RunConfig` with the CLI's messages (`format_validation_error`). Keys that
would let a client reach the file system or run code are refused by name (`REFUSED`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gemcut.config import RunConfig, format_validation_error, set_path
from gemcut.data.assets import is_alias
from gemcut.errors import GemcutError
from gemcut.tasks import AUTO, TASKS

GEMCUT = "extra_body.gemcut"  # how params name the request's `gemcut` object: the openai client sends it in extra_body
METHODS = ("supervised", "dpo", "reinforcement")
REQUEST_FIELDS = ("model", "training_file", "validation_file", "suffix", "seed", "metadata", "method", "hyperparameters",
                  "integrations", "gemcut")
HYPERPARAMETERS = {
    "supervised": ("batch_size", "learning_rate_multiplier", "n_epochs"),
    "dpo": ("batch_size", "beta", "learning_rate_multiplier", "n_epochs"),
    "reinforcement": ("batch_size", "compute_multiplier", "eval_interval", "eval_samples", "learning_rate_multiplier",
                      "n_epochs", "reasoning_effort"),
}
# The objectives each method may train (the first is the default; gemcut/tasks.py says what records each takes).
OBJECTIVES = {"supervised": ("causal_lm", "classify", "auto"), "dpo": ("dpo",), "reinforcement": ("grpo", "ppo")}
# The config key each hyperparameter sets: given both ways, the job would say one thing and train another.
HYPERPARAMETER_KEYS = {
    "n_epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "learning_rate_multiplier": ("train", "lr"),
    "beta": ("objective", "dpo", "beta"), "compute_multiplier": ("objective", "rl", "group_size"),
    "eval_interval": ("train", "eval_every"), "eval_samples": ("train", "val_max_examples"),
}
# Overrides a job may not make, each with why (a prefix refuses everything under it).
REFUSED: dict[tuple[str, ...], str] = {
    ("data", "train"): "a job trains on its training_file",
    ("data", "validation"): "a job validates on its validation_file (or a split of its training_file: data.split.validation)",
    ("data", "test"): "a job is tested on a split of its training_file (size it with data.split.test)",
    ("data", "format"): "uploaded training files are JSONL",
    ("model", "name"): "the base model is the job's `model`",
    ("model", "revision"): "the base model is the job's `model`, at the revision this server holds",
    ("model", "trust_remote_code"): "code from a model repository never runs in this service",
    ("objective", "rl", "reward_model"): "a reward model is a folder on the server; a reinforcement job is graded by method.reinforcement.grader",
    ("objective", "rl", "reward_label"): "a reinforcement job is graded by method.reinforcement.grader, not a reward model",
    ("objective", "rl", "grader"): "give the grader as method.reinforcement.grader",
    ("output",): "the service names and places each job's run folder",
    ("train", "report_to"): "trackers write or send metrics outside the job's run folder; the job's events and result file carry them",
}
SUFFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_METADATA, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_SEED = 2**31 - 1
LABEL_INSTRUCTION = "Classify the text as one of: {labels}. Answer with the label only.\n\nText: {text}"

# "auto", as the module docstring explains.
AUTO_EPOCHS, MIN_EXAMPLES_SEEN, MAX_EXAMPLES_SEEN, MAX_AUTO_EPOCHS = 3, 100, 25_000, 25
AUTO_BATCH = {"supervised": 8, "dpo": 8, "reinforcement": 4}
AUTO_BETA = 0.1
GROUP_SIZE_PER_COMPUTE = 4
AUTO_RL_EVAL_SAMPLES = 24
SAVE_EVERY = {"lora": 10, "full": 25}
KEEP_LAST_N = 3
VAL_MAX_EXAMPLES = 100


class JobSpecError(GemcutError):
    """A job request that cannot run as asked: `message` says what and how to fix it, `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class JobSpec:
    method: dict  # OpenAI's `method` object, "auto" replaced by the numbers chosen
    hyperparameters: dict  # the legacy top-level object: n_epochs, batch_size, learning_rate_multiplier
    config: dict  # RunConfig.model_dump(): validated; the worker adds data paths and the output folder
    seed: int


def base_learning_rate(objective: str, adapter: str) -> float:
    """gemcut's learning rate for an objective and adapter method, the one learning_rate_multiplier multiplies."""
    if adapter in ("lora", "qlora"):
        return 5e-4 if objective in ("grpo", "ppo") else 2e-4
    return 1e-4 if objective == "classify" else 2e-5


def auto_epochs(method: str, training_records: int | None) -> int:
    if method == "reinforcement":
        return 1
    if not training_records:
        return AUTO_EPOCHS
    if training_records * AUTO_EPOCHS < MIN_EXAMPLES_SEEN:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / training_records))
    if training_records * AUTO_EPOCHS > MAX_EXAMPLES_SEEN:
        return max(1, MAX_EXAMPLES_SEEN // training_records)
    return AUTO_EPOCHS


def job_spec(request: Mapping, *, base_model_source: str, training_kind: str, validation: bool, seed_default: int,
             training_counts: Mapping | None = None, validation_kind: str | None = None,
             validation_counts: Mapping | None = None) -> JobSpec:
    """The job `request` (the JSON body) as a run config on `base_model_source` (a served model's folder or a
    packaged alias, resolved by the caller from `model`). `training_kind`: the record kind the upload check
    found in training_file; `validation`: whether the request names a validation_file; `seed_default`: the
    seed when the request has none. `training_counts`: the upload check's counts of training_file
    (`UploadCheck.counts`, kept as the file's report), when known: its `examples` size "auto" epochs and
    batch, and reinforcement rows (`item_fields`, `without_reply`) are refused by the other methods.
    `validation_kind` and `validation_counts`: the same of validation_file, when there is one: checked the
    same way, and its kind must be the training file's."""
    if not isinstance(request, Mapping):
        raise JobSpecError(f"the request body must be a JSON object, got {type(request).__name__}")
    for key in request:
        if key not in REQUEST_FIELDS:
            raise JobSpecError(f"unknown parameter {key!r}; a fine-tuning job takes {', '.join(REQUEST_FIELDS)}", param=str(key))
    method_type, given = _method(request)
    check_integrations(request.get("integrations"))
    seed = check_seed(request.get("seed"), seed_default)
    check_suffix(request.get("suffix"))
    check_metadata(request.get("metadata"))
    overrides = flatten_overrides(request.get("gemcut"))
    set_by = {path: value for path, value in overrides}

    kind = set_by.get(("data", "kind"), training_kind)
    objective = _objective(method_type, kind, set_by)
    counts = training_counts or {}
    check_kind(method_type, objective, kind, counts)
    if validation_kind is not None:
        check_validation_kind(training_kind, validation_kind, kind)
        check_kind(method_type, objective, kind if kind == "text" else validation_kind, validation_counts or {}, "validation_file")
    adapter = set_by.get(("adapter", "method"), "lora")
    base_lr = base_learning_rate(objective, str(adapter))
    for name, value in given.items():
        _no_second_setting(method_type, name, value, set_by)

    raw = service_defaults(method_type, objective, training_kind, base_model_source, adapter=str(adapter), validation=validation, seed=seed)
    raw = _with_hyperparameters(raw, method_type, given, base_lr, counts.get("examples"))
    if method_type == "reinforcement":
        _set(raw, ("objective", "rl", "grader"), dict(given["grader"]))
        _set(raw, ("data", "extra_fields"), "keep")
    for path, value in overrides:
        _set(raw, path, value)
    cfg = _validated(raw)
    method = answered_method(method_type, cfg, base_lr, given)
    legacy = {k: method[method_type]["hyperparameters"][k] for k in HYPERPARAMETERS["supervised"]}
    return JobSpec(method=method, hyperparameters=legacy, config=cfg.model_dump(mode="json"), seed=seed)


# ---------------------------------------------------------------- the request's fields


def _method(request: Mapping) -> tuple[str, dict]:
    """(method type, {hyperparameter: value as given, "grader": ...}) from `method`, or from the deprecated
    top-level `hyperparameters` (supervised)."""
    method, legacy = request.get("method"), request.get("hyperparameters")
    if method is None:
        return "supervised", _hyperparameters("supervised", legacy, "hyperparameters")
    if not isinstance(method, Mapping):
        raise JobSpecError(f'method must be an object {{"type": "supervised" | "dpo" | "reinforcement", ...}}, got {_short(method)}', "method")
    mtype = method.get("type")
    if mtype not in METHODS:
        raise JobSpecError(f"method.type must be one of {', '.join(METHODS)}, got {_short(mtype)}", "method.type")
    for key in method:
        if key in METHODS and key != mtype:
            raise JobSpecError(f"method.{key}: a {mtype} job takes method.{mtype}; remove method.{key} (or set method.type to {key})",
                               f"method.{key}")
        if key not in ("type", mtype):
            raise JobSpecError(f"method.{key} is not a method field; method holds type and {mtype}", f"method.{key}")
    body = {} if method.get(mtype) is None else method[mtype]
    if not isinstance(body, Mapping):
        raise JobSpecError(f"method.{mtype} must be an object, got {_short(body)}", f"method.{mtype}")
    allowed = ("hyperparameters", "grader") if mtype == "reinforcement" else ("hyperparameters",)
    for key in body:
        if key not in allowed:
            raise JobSpecError(f"method.{mtype}.{key} is not a field of the {mtype} method (it takes {', '.join(allowed)})",
                               f"method.{mtype}.{key}")
    if legacy is not None and (mtype != "supervised" or body.get("hyperparameters") is not None):
        raise JobSpecError(f"the top-level hyperparameters are deprecated; give them only in method.{mtype}.hyperparameters",
                           "hyperparameters")
    given = _hyperparameters(mtype, body.get("hyperparameters", legacy), f"method.{mtype}.hyperparameters")
    if mtype == "reinforcement":
        given["grader"] = _grader(body.get("grader"))
    return mtype, given


def _hyperparameters(mtype: str, hp: Any, where: str) -> dict:
    """The hyperparameters given (None and "auto" left out), each checked for its type and range."""
    if hp is None:
        return {}
    if not isinstance(hp, Mapping):
        raise JobSpecError(f"{where} must be an object, got {_short(hp)}", where)
    out = {}
    for name, value in hp.items():
        param = f"{where}.{name}"
        if name not in HYPERPARAMETERS[mtype]:
            raise JobSpecError(f"{param}: {mtype} jobs take {', '.join(HYPERPARAMETERS[mtype])}", param)
        if value is None or value == "auto":
            continue
        if name == "reasoning_effort":
            if value != "default":
                raise JobSpecError(f"{param}={value!r} cannot be honoured: gemcut's models have no reasoning-effort setting; "
                                   'leave it out or use "default"', param)
            continue
        integral = name in ("n_epochs", "batch_size", "eval_interval", "eval_samples")
        number = isinstance(value, int) if integral else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or not math.isfinite(value) or value <= 0:
            what = "a whole number of at least 1" if integral else "a positive number"
            raise JobSpecError(f'{param} must be "auto" or {what}, got {_short(value)}', param)
        out[name] = value
    return out


def _grader(grader: Any) -> dict:
    """The grader object, checked for a type here; its fields are validated by the run config (objective.rl.grader)."""
    if not isinstance(grader, Mapping) or not isinstance(grader.get("type"), str):
        raise JobSpecError('method.reinforcement.grader is required: an object such as {"type": "string_check", "name": ..., '
                           f'"input": "{{{{sample.output_text}}}}", "reference": "{{{{item.answer}}}}", "operation": "eq"}}; got {_short(grader)}',
                           "method.reinforcement.grader")
    return dict(grader)


def check_integrations(integrations: Any) -> None:
    if integrations:
        raise JobSpecError("integrations (Weights and Biases) would send the job's metrics to another service; this server "
                           "keeps them on the machine (the job's events and result file): leave integrations out", "integrations")


def check_seed(seed: Any, default: int) -> int:
    if seed is None:
        return default
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise JobSpecError(f"seed must be a whole number from 0 to {MAX_SEED}, got {_short(seed)}", "seed")
    return seed


def check_suffix(suffix: Any) -> None:
    if suffix is None or suffix == "":
        return
    if not isinstance(suffix, str) or not SUFFIX.match(suffix):
        raise JobSpecError(f"suffix must be at most 64 characters of letters, digits, '-', '_' and '.' (it becomes part of "
                           f"the model name ft:base:owner:suffix:id), got {_short(suffix)}", "suffix")


def check_metadata(metadata: Any) -> None:
    """OpenAI's rule: at most 16 pairs of strings, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise JobSpecError(f"metadata must be an object of string keys and values, got {_short(metadata)}", "metadata")
    if len(metadata) > MAX_METADATA:
        raise JobSpecError(f"metadata has {len(metadata)} pairs; at most {MAX_METADATA} are allowed", "metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > MAX_METADATA_KEY:
            raise JobSpecError(f"metadata key {_short(key)} must be a string of at most {MAX_METADATA_KEY} characters", "metadata")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise JobSpecError(f"metadata[{key!r}] must be a string of at most {MAX_METADATA_VALUE} characters, got {_short(value)}",
                               "metadata")


# ---------------------------------------------------------------- extra_body.gemcut


def flatten_overrides(gemcut: Any) -> list[tuple[tuple[str, ...], Any]]:
    """`{"adapter": {"method": "lora", "r": 8}, "objective.kind": "classify"}` -> [(("adapter", "method"), "lora"),
    (("adapter", "r"), 8), (("objective", "kind"), "classify")]: nested and dotted keys alike, in order. Keys a
    job may not set are refused here, by name."""
    if gemcut is None:
        return []
    if not isinstance(gemcut, Mapping):
        raise JobSpecError(f'{GEMCUT} must be an object of run-config overrides, e.g. {{"adapter": {{"r": 8}}}}, got {_short(gemcut)}', GEMCUT)
    out: list[tuple[tuple[str, ...], Any]] = []

    def walk(prefix: tuple[str, ...], node: Mapping) -> None:
        for key, value in node.items():
            parts = tuple(p.strip() for p in str(key).split("."))
            path = prefix + parts
            if not all(parts):
                raise JobSpecError(f"{GEMCUT}: key {'.'.join(path)!r} has an empty part", _param(path))
            _refuse(path, value)
            if isinstance(value, Mapping) and not _is_mapping_field(path):
                walk(path, value)  # an empty section sets nothing (it must not wipe the job's own settings)
            else:
                out.append((path, value))

    walk((), gemcut)
    return out


def _refuse(path: tuple[str, ...], value: Any) -> None:
    for prefix, why in REFUSED.items():
        if path[: len(prefix)] == prefix:
            raise JobSpecError(f"{GEMCUT}: {'.'.join(path)} cannot be set by a job: {why}", _param(path))
    if path == ("eval", "forgetting_data"):
        plain = value is None or (isinstance(value, str) and (value.strip().lower() in ("none", "null", "") or is_alias(value)))
        if not plain:
            raise JobSpecError(f"{GEMCUT}: eval.forgetting_data names a packaged data set (chatterbot, chitchat, ...) or none, "
                               f"never a path on the server; got {_short(value)}", _param(path))


def _is_mapping_field(path: tuple[str, ...]) -> bool:
    """Whether the config field at `path` is itself a mapping (data.columns), so a dict value is its value."""
    return path in (("data", "columns"),)


def _param(path: tuple[str, ...]) -> str:
    return ".".join((GEMCUT, *path))


def _set(raw: dict, path: tuple[str, ...], value: Any) -> None:
    # Not config.apply_overrides: that parses `a.b=text` from a command line as YAML, and these values are
    # JSON already (a string "8" stays a string; pydantic converts where a field wants a number).
    set_path(raw, path, value)


def _no_second_setting(mtype: str, name: str, value: Any, set_by: dict) -> None:
    key = HYPERPARAMETER_KEYS.get(name)
    others = [key] if key else []
    if name == "n_epochs":
        others.append(("train", "max_steps"))  # max_steps overrides epochs
    for other in others:
        if other in set_by:
            raise JobSpecError(f"method.{mtype}.hyperparameters.{name}={value} and {GEMCUT} {'.'.join(other)} both set how the job "
                               "trains; give one of them", _param(other))


# ---------------------------------------------------------------- the run config


def _objective(mtype: str, kind: str, set_by: dict) -> str:
    allowed = OBJECTIVES[mtype]
    chosen = set_by.get(("objective", "kind"), allowed[0])
    if chosen not in allowed:
        fits = [m for m, objs in OBJECTIVES.items() if chosen in objs]
        fix = f"use method.type {fits[0]}" if fits else f"use one of {', '.join(allowed)}"
        raise JobSpecError(f"{GEMCUT}: objective.kind={chosen} is not a {mtype} objective ({', '.join(allowed)}); {fix}",
                           _param(("objective", "kind")))
    if chosen == "auto":  # what objective.kind auto trains on these records (label: a classifier head), if the method may
        chosen = AUTO.get(kind) if AUTO.get(kind) in allowed else allowed[0]
    return chosen


def check_kind(mtype: str, objective: str, kind: str, counts: Mapping, param: str = "training_file") -> None:
    """The records of the file `param` names must be ones the method's objective trains on (gemcut/tasks.py),
    and only a reinforcement job reads rows with item fields or conversations without a reply (`counts`: the
    upload check's counts of that file)."""
    task = TASKS.get(objective)
    if task is not None and kind not in task.shapes:
        fits = [m for m in METHODS if any(kind in TASKS[o].shapes for o in OBJECTIVES[m] if o in TASKS)]
        fix = f"use method.type {' or '.join(fits)}" if fits else "upload records of one of those kinds"
        raise JobSpecError(f"{param} holds {kind} records, but a {mtype} job ({objective}) trains on "
                           f"{', '.join(task.shapes)} records; {fix}", param)
    if mtype == "reinforcement":
        return
    if counts.get("item_fields"):
        raise JobSpecError(f"{param}'s records carry fields a {mtype} job does not read ({', '.join(counts['item_fields'])}: "
                           "extra fields are the items of reinforcement rows, for a grader); remove them, or prefix each with _", param)
    if counts.get("without_reply"):
        raise JobSpecError(f"{param} has {counts['without_reply']} conversations that end without an assistant reply, so a "
                           f"{mtype} job has nothing to learn from them (only a reinforcement job samples replies itself); "
                           "add the replies, or use method.type reinforcement", param)


def check_validation_kind(training_kind: str, validation_kind: str, kind: str) -> None:
    """A run reads one record kind: validation records must be of the training file's (unless data.kind: text
    flattens both into documents)."""
    if validation_kind != training_kind and kind != "text":
        raise JobSpecError(f"validation_file holds {validation_kind} records, but training_file holds {training_kind} records, and "
                           f"a job validates on records of the kind it trains on; upload {training_kind} records as validation_file",
                           "validation_file")


def service_defaults(mtype: str, objective: str, training_kind: str, base_model_source: str, *, adapter: str, validation: bool,
                     seed: int) -> dict:
    """What every job of this method starts from, before its hyperparameters and overrides (module docstring)."""
    save_every = SAVE_EVERY["lora" if adapter in ("lora", "qlora") else "full"]
    raw: dict = {
        "data": {"format": "jsonl", "kind": training_kind},
        "model": {"name": base_model_source},
        "adapter": {"method": "lora"},
        "objective": {"kind": objective},
        "train": {"seed": seed, "save_every": save_every, "keep_last_n": KEEP_LAST_N, "val_max_examples": VAL_MAX_EXAMPLES},
    }
    if validation:
        raw["train"]["eval_every"] = 2 * save_every
    if training_kind == "label" and objective == "causal_lm":
        raw["data"]["instruction"] = LABEL_INSTRUCTION  # DataConfig's default speaks of sentiment
    if mtype == "reinforcement":
        raw["train"]["val_max_examples"] = AUTO_RL_EVAL_SAMPLES
    return raw


def _with_hyperparameters(raw: dict, mtype: str, given: dict, base_lr: float, training_records: int | None) -> dict:
    epochs = given.get("n_epochs", auto_epochs(mtype, training_records))
    batch = given.get("batch_size", AUTO_BATCH[mtype] if not training_records else min(AUTO_BATCH[mtype], training_records))
    _set(raw, ("train", "epochs"), epochs)
    _set(raw, ("train", "batch_size"), batch)
    _set(raw, ("train", "lr"), base_lr * given.get("learning_rate_multiplier", 1.0))
    if mtype == "dpo":
        _set(raw, ("objective", "dpo", "beta"), given.get("beta", AUTO_BETA))
    if mtype == "reinforcement":
        group = max(2, round(GROUP_SIZE_PER_COMPUTE * given.get("compute_multiplier", 1.0)))
        _set(raw, ("objective", "rl", "group_size"), group)
        if "eval_interval" in given:
            _set(raw, ("train", "eval_every"), given["eval_interval"])
        if "eval_samples" in given:
            _set(raw, ("train", "val_max_examples"), given["eval_samples"])
    return raw


def _validated(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        loc = tuple(str(x) for x in err.errors()[0]["loc"])
        grader = ("objective", "rl", "grader")
        if loc[:3] == grader:
            raise JobSpecError(format_validation_error(err, "method.reinforcement.grader"),
                               ".".join(("method.reinforcement.grader", *loc[3:]))) from None
        if not loc:  # a cross-field check: the CLI's line would end with the whole config as "given"
            problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise JobSpecError(f"{GEMCUT}: {problems}", GEMCUT) from None
        raise JobSpecError(format_validation_error(err, GEMCUT), _param(loc)) from None


def answered_method(mtype: str, cfg: RunConfig, base_lr: float, given: dict) -> dict:
    """OpenAI's `method` object with the numbers the config trains with (an override's, where one was given)."""
    t = cfg.train
    hp: dict[str, Any] = {"batch_size": t.batch_size, "learning_rate_multiplier": _round(t.lr / base_lr),
                          "n_epochs": int(t.epochs) if float(t.epochs).is_integer() else t.epochs}
    body: dict[str, Any] = {"hyperparameters": hp}
    if mtype == "dpo":
        hp["beta"] = cfg.objective.dpo.beta
    if mtype == "reinforcement":
        hp.update(compute_multiplier=_round(cfg.objective.rl.group_size / GROUP_SIZE_PER_COMPUTE), eval_interval=t.eval_every,
                  eval_samples=t.val_max_examples, reasoning_effort="default")
        body = {"grader": given["grader"], "hyperparameters": hp}
    return {"type": mtype, mtype: body}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
