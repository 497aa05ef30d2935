"""The typed run configuration: one pydantic model per section, validated once.

    gemcut config show examples/sft_chatterbot.yaml train.lr=1e-4
    gemcut config schema

A run is `RunConfig`: data, model, adapter, objective, train, eval, output. YAML files load into it, and
`a.b=c` overrides are applied on top before validation (values parse as YAML scalars, so `train.lr=1e-4`
is a float and `data.train=[a.jsonl,b.jsonl]` a list). Errors name the field's path, what was given, what
is allowed, and suggest the nearest valid key for typos. This module must not import torch.
"""

from __future__ import annotations

import codecs
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gemcut.errors import ConfigError
from gemcut.tasks import TASKS, Task


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated too, and a float field
    refuses inf and nan (`train.lr=inf` would poison every weight at the first step)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)


RecordKind = Literal["auto", "text", "prompt_completion", "messages", "label", "preference"]


class CleanConfig(Section):
    strip_html: bool = Field(True, description="Remove HTML markup (tags of HTML elements, comments) and decode entities there; code and tags such as <T> are left alone.")
    fix_mojibake: bool = Field(True, description="Repair broken encodings (ftfy), counted in the report.")
    normalize_unicode: bool = Field(True, description="NFC-normalise text.")
    normalize_whitespace: bool = Field(True, description="Unify line ends, trim trailing whitespace, 3+ blank lines -> 2 (indentation kept); label text: collapse runs of spaces too.")
    dedup_exact: bool = Field(True, description="Drop exact duplicates (after normalisation).")
    dedup_near: bool = Field(False, description="Drop near duplicates (MinHash LSH).")
    near_threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity above which two records are near duplicates.")
    min_chars: int = Field(1, ge=0, description="Drop records whose text is shorter than this.")
    max_chars: int | None = Field(None, ge=1, description="Drop records whose text is longer than this.")


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of records for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of records for test.")
    seed: int = Field(0, description="Seed of the deterministic split (a seeded hash of each record's file and position).")
    stratify: bool = Field(True, description="Stratify by label where records have one.")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError(f"split.validation + split.test = {self.validation + self.test} leaves no training data; make the sum < 1")
        return self


def _known_encoding(name: str) -> str:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown encoding {name!r}; use a Python codec name such as utf-8, cp1252 or latin-1") from None
    return name


Encoding = Annotated[str, AfterValidator(_known_encoding)]


class MixtureSource(Section):
    """One source of a data mixture: its files and the options that differ between tasks (the rest come from
    `data`). Each source is read, cleaned, split and checked for leakage on its own, then rendered as chats."""

    name: str = Field(description="The source's (task's) name, shown in the data report and the per-task metrics of eval, e.g. sentiment or chat.")
    train: list[str] = Field(description="Training files or folders, or a packaged dataset alias (as data.train).")
    validation: list[str] = Field(default_factory=list, description="Validation files; when empty, split from train with data.split.")
    test: list[str] = Field(default_factory=list, description="Test files; when empty, split from train with data.split.")
    kind: RecordKind = Field("auto", description="Record kind of this source: label, prompt_completion or messages (each becomes a chat); auto infers it.")
    columns: dict[str, str] = Field(default_factory=dict, description="Map gemcut field -> column name, for this source (as data.columns).")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "markdown", "chatterbot"] = Field("auto", description="File format; auto uses the extension.")
    labels: list[str] | None = Field(None, description="label sources: the declared label set, in order (as data.labels).")
    instruction: str | None = Field(None, description="label sources: how a record is asked ({labels}, {text} filled in); None: data.instruction.")
    system_prompt: str | None = Field(None, description="A system turn added to this source's conversations that have none (before data.system_prompt would be).")
    on_error: Literal["fail", "skip"] | None = Field(None, description="On a bad record of this source; None: data.on_error.")
    limit: int | None = Field(None, ge=1, description="Use only the first N training records of this source (after splitting); None: data.limit.")
    weight: float | None = Field(None, gt=0, description="Sampling weight: the share of training batches' examples drawn from this source is weight / sum of weights. Give every source a weight, or none (then data.mixture.temperature decides).")

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_labels_are_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v


class MixtureConfig(Section):
    """Several sources trained together in one run (multi-task): every record becomes a chat, so one causal-LM
    objective trains them all; each training example is drawn from a source with the source's sampling share."""

    sources: list[MixtureSource] = Field(description="The sources (tasks), each with its files, kind and options.")
    temperature: float | None = Field(None, gt=0, description="Without weights: sample source s with probability proportional to n_s^(1/temperature) (n_s its training examples): 1 is proportional to size, larger evens the sources out (Arivazhagan et al., 2019). None: 1, or the weights when given.")

    @model_validator(mode="after")
    def _weights_or_temperature(self) -> MixtureConfig:
        if not self.sources:
            raise ValueError("data.mixture.sources is empty; list at least one source (name, train)")
        names = [s.name for s in self.sources]
        for i, name in enumerate(names):
            if not name.strip():
                raise ValueError(f"data.mixture.sources[{i}].name is empty; name each source (it labels its counts and metrics)")
            if name in names[:i]:
                raise ValueError(f'data.mixture.sources: the name "{name}" is used twice; give each source its own name')
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            missing = ", ".join(s.name for s in self.sources if s.weight is None)
            raise ValueError(f"data.mixture.sources: some sources have a weight and {missing} do not; give every source a weight, or none")
        if all(weighted) and self.temperature is not None:
            raise ValueError("data.mixture has both weights and a temperature; the shares come from one of them, so remove data.mixture.temperature or the weights")
        return self


class ParaphraseConfig(Section):
    """Paraphrases of training prompts written by a model through gemcut's sampler (gemcut/generation.py)."""

    model: str = Field(description="The model that writes the paraphrases: a model alias, hub id or local folder, or a gemcut run folder.")
    share: float = Field(0.2, gt=0, le=1, description="Share of training records that get a paraphrased copy (chosen by a seeded hash of each record).")
    max_new_tokens: int = Field(64, ge=1, description="Generation budget per paraphrase.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0: greedy); seeded by data.augment.seed.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    instruction: str = Field("Rewrite the following text in other words, keeping its meaning and its tone. Answer with the rewritten text only.\n\nText: {text}",
                             description="How the model is asked for a paraphrase ({text} is filled in).")


AUGMENT_OPERATIONS = ("word_dropout", "word_swap", "lowercase")


class AugmentConfig(Section):
    """Extra training records made from the training split only (after splitting), each marked `augmented`,
    never in validation or test, and checked for leakage against them like any training record."""

    paraphrase: ParaphraseConfig | None = Field(None, description="Paraphrase a share of training prompts with a model; None: no paraphrases.")
    operations: dict[str, float] = Field(default_factory=dict, description=f"Cheap text operations and the share of training records each copies: {', '.join(AUGMENT_OPERATIONS)} (e.g. {{word_dropout: 0.1}}).")
    word_dropout: float = Field(0.1, gt=0, lt=1, description="word_dropout: the probability that each word is dropped (one word always stays).")
    seed: int = Field(0, description="Seed of which records are augmented and of the operations and sampling.")

    @field_validator("operations")
    @classmethod
    def _known_operations(cls, value: dict[str, float]) -> dict[str, float]:
        for name, share in value.items():
            if name not in AUGMENT_OPERATIONS:
                near = difflib.get_close_matches(name, AUGMENT_OPERATIONS, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown operation {name!r}{hint} Known: {', '.join(AUGMENT_OPERATIONS)}")
            if not 0 < share <= 1:
                raise ValueError(f"operations.{name}: the share of records is {share}; give a number in (0, 1]")
        return value

    @property
    def active(self) -> bool:
        return self.paraphrase is not None or bool(self.operations)


class DataConfig(Section):
    train: list[str] = Field(default_factory=list, description="Training files or folders (jsonl, json, csv, tsv, parquet, txt, md, chatterbot yml), or a packaged dataset alias.")
    validation: list[str] = Field(default_factory=list, description="Validation files; when empty, split from train.")
    test: list[str] = Field(default_factory=list, description="Test files; when empty, split from train.")
    kind: RecordKind = Field("auto", description="Record kind; auto infers it from the fields of the first record.")
    columns: dict[str, str] = Field(default_factory=dict, description="Map gemcut field -> your column name, e.g. {text: tweet, label: sentiment}.")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "markdown", "chatterbot"] = Field("auto", description="File format; auto uses the extension.")
    encoding: Encoding = Field("utf-8", description="Encoding tried first (a Python codec name; utf-16 reads the whole file as UTF-16, without fallbacks).")
    fallback_encodings: list[Encoding] = Field(default_factory=lambda: ["cp1252", "latin-1"], description="Encodings tried, in order, when a file is not valid in `encoding`; counted in the report.")
    on_error: Literal["fail", "skip"] = Field("fail", description="On a bad record: stop with its file:line, or skip it and count it in the report.")
    extra_fields: Literal["error", "keep"] = Field("error", description="Top-level fields a record's kind does not use: error (a likely typo, named with its file:line), or keep them as the record's `item` (OpenAI's reinforcement rows: graders read them as {{item.x}}).")
    prompts_only: bool = Field(False, description="Records are prompts that RL answers itself: a messages record may end with the user's turn and need no assistant reply. Set automatically for objective.kind grpo and ppo.")
    delimiter: str | None = Field(None, description="CSV/TSV field separator, one character (e.g. ';'); None: a comma for .csv, a tab for .tsv.")
    labels: list[str] | None = Field(None, description="Declared label set for `label` records, in the order of the label ids; others are errors.")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_length: int = Field(512, ge=8, description="Maximum tokens per training example.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What happens to examples longer than max_length (always counted).")
    limit: int | None = Field(None, ge=1, description="Use only the first N records after cleaning and splitting (for quick runs); counted in the report.")
    template: str | None = Field(None, description="Chat template: None uses the tokenizer's own; a named template (chatml, alpaca, plain) for base models.")
    train_on: Literal["completion", "all"] = Field("completion", description="Which tokens carry loss in SFT: only completion/assistant tokens, or all.")
    packing: bool = Field(False, description="Pack several examples into one sequence (no attention across examples).")
    system_prompt: str | None = Field(None, description="System message prepended to prompts that have none.")
    instruction: str = Field(
        "Classify the sentiment of the text as one of: {labels}. Answer with the label only.\n\nText: {text}",
        description="How `label` records are rendered as a prompt when a causal LM learns them as a generative classifier ({labels}, {text} are filled in).",
    )
    mixture: MixtureConfig | None = Field(None, description="Several sources (tasks) trained together in one run, instead of data.train (docs/data.md, Mixtures).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Extra training records: paraphrases by a model and cheap text operations (docs/data.md, Augmentation).")

    @model_validator(mode="after")
    def _mixture_replaces_train(self) -> DataConfig:
        if self.mixture is not None:
            given = [f"data.{s}" for s in ("train", "validation", "test") if getattr(self, s)]
            if given:
                raise ValueError(f"{' and '.join(given)} and data.mixture are both set; a mixture names its files in each "
                                 "source (data.mixture.sources[i].train), so move them there")
            if self.packing:
                raise ValueError("data.packing with data.mixture would put examples of several sources in one row, and the "
                                 "mixture samples examples one by one; set data.packing=false")
        return self

    def training_sources(self) -> list[str]:
        """Every file, folder or alias the run trains on: data.train, or each mixture source's train files."""
        if self.mixture is None:
            return list(self.train)
        return [name for s in self.mixture.sources for name in s.train]

    @field_validator("delimiter")
    @classmethod
    def _one_character(cls, v: str | None) -> str | None:
        if v is not None and len(v) != 1:
            raise ValueError('must be one character, e.g. ";" or "\\t" (a tab, written in double quotes in YAML)')
        return v

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_labels_are_names(cls, v: Any) -> Any:
        # `labels: [0, 1]` in YAML: integer class ids, read the same way as integer labels in records.
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("labels")
    @classmethod
    def _labels_listed_once(cls, v: list[str] | None) -> list[str] | None:
        for i, x in enumerate(v or []):
            if x in v[:i]:
                raise ValueError(f'"{x}" is listed twice; list each label once (their order gives the label ids)')
        return v


class ModelConfig(Section):
    name: str = Field("smollm2-135m-instruct", description="Alias (`gemcut models`), local folder, or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch).")
    trust_remote_code: bool = Field(False, description="Allow code from the model repository to run. Off unless you trust it.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("float32", description="Dtype the weights are kept in; training uses train.precision for compute.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field("auto", description="Attention kernel. auto: flash_attention_2 where it can run (a CUDA GPU, the flash_attn package, bf16 weights or a QLoRA base), else sdpa; flash_attention_2 asked for where it cannot run is an error that names the fix (docs/models.md).")
    dropout: float | None = Field(None, ge=0, lt=1, description="Set every dropout probability of the model (hidden, attention, classifier) to this; null keeps the checkpoint's.")
    pooling: Literal["auto", "cls", "mean"] = Field("auto", description="Encoder classifiers: read the first token (cls) or the mean of the tokens (mean); auto follows the checkpoint (sentence-transformers models pool by mean).")


class AdapterConfig(Section):
    method: Literal["lora", "qlora", "freeze", "full"] = Field("lora", description="lora: low-rank adapters; qlora: LoRA in bf16 on a base loaded in 4 bits through bitsandbytes (a CUDA GPU only); freeze: train only the last N blocks and the head; full: every weight.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get adapters: 'all-linear' or a list of names.")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    train_last_n_layers: int = Field(2, ge=0, description="For method=freeze: how many final blocks train (the head always trains).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="For method=qlora: the 4-bit data type of the frozen base (nf4, NormalFloat4, is QLoRA's).")
    double_quant: bool = Field(True, description="For method=qlora: quantize the 4-bit blocks' scales too (about 0.37 bits a weight saved, Dettmers et al., 2023).")

    def base_quantization(self) -> dict | None:
        """How the base model is loaded for this adapter: {"bits": 4, "quant_type", "double_quant"} for
        qlora, None (the checkpoint's own weights) otherwise. `gemcut.models.load.load_base(quantization=...)`."""
        if self.method != "qlora":
            return None
        return {"bits": 4, "quant_type": self.quant_type, "double_quant": self.double_quant}


class DPOConfig(Section):
    beta: float = Field(0.1, gt=0, description="DPO temperature on the implicit reward.")


GRADER_TYPES = ("string_check", "text_similarity")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
# What OpenAI's graders offer and gemcut does not: model and code graders, and metrics that need an embedding
# model (cosine) or data that is not installed (meteor's WordNet, gleu's nltk).
REFUSED_GRADER_TYPES = ("multi", "python", "score_model", "label_model")
REFUSED_METRICS = ("cosine", "gleu", "meteor")
TEMPLATE = re.compile(r"\{\{\s*(.*?)\s*\}\}")  # {{ sample.output_text }}, {{item.answer}}


def template_references(text: str) -> list[str]:
    """The dotted names a grader template refers to: "{{item.a.b}} vs {{sample.output_text}}" -> ["item.a.b", ...]."""
    return TEMPLATE.findall(text)


def _check_template(text: str, field: str) -> str:
    for name in template_references(text):
        head, _, rest = name.partition(".")
        if (head == "sample" and rest == "output_text") or (head == "item" and rest and all(rest.split("."))):
            continue
        raise ValueError(f"template {{{{{name}}}}} in {field} is not one gemcut fills in; use {{{{sample.output_text}}}} (the "
                         "sampled completion) or {{item.<field>}} (a field of the data row, nested as item.a.b)")
    return text


class GraderConfig(Section):
    """One of OpenAI's simple graders (the shapes of openai.types.graders), scoring each sampled completion
    as the RL reward (gemcut/objectives/graders.py)."""

    type: str = Field(description=f"The grader: {' or '.join(GRADER_TYPES)}.")
    name: str = Field("grader", description="The grader's name (shown in logs).")
    input: str = Field("{{sample.output_text}}", description="The text graded, a template: {{sample.output_text}} is the completion, {{item.x}} a field of the data row.")
    reference: str = Field(description="The text it is compared with, a template such as {{item.reference_answer}}.")
    operation: Literal["eq", "ne", "like", "ilike"] | None = Field(None, description="string_check: eq (equal), ne (not equal), like (input contains reference), ilike (the same, ignoring case); 1.0 when it holds, else 0.0.")
    evaluation_metric: str | None = Field(None, description=f"text_similarity: {', '.join(SIMILARITY_METRICS)} (a score in [0, 1]).")

    @field_validator("type")
    @classmethod
    def _supported_type(cls, value: str) -> str:
        if value in GRADER_TYPES:
            return value
        known = "an OpenAI grader type gemcut does not run" if value in REFUSED_GRADER_TYPES else "not a grader type"
        raise ValueError(f"type {value!r} is {known}; use {' or '.join(GRADER_TYPES)}")

    @field_validator("evaluation_metric")
    @classmethod
    def _supported_metric(cls, value: str | None) -> str | None:
        if value is None or value in SIMILARITY_METRICS:
            return value
        known = "is not supported here" if value in REFUSED_METRICS else "is not a similarity metric"
        raise ValueError(f"evaluation_metric {value!r} {known}; use {', '.join(SIMILARITY_METRICS)}")

    @field_validator("input", "reference")
    @classmethod
    def _known_templates(cls, value: str, info) -> str:
        return _check_template(value, f"objective.rl.grader.{info.field_name}")

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> GraderConfig:
        if self.type == "string_check" and (self.operation is None or self.evaluation_metric is not None):
            raise ValueError("a string_check grader takes operation (eq, ne, like or ilike) and no evaluation_metric"
                             + ("" if self.operation is None else "; remove evaluation_metric"))
        if self.type == "text_similarity" and (self.evaluation_metric is None or self.operation is not None):
            raise ValueError(f"a text_similarity grader takes evaluation_metric ({', '.join(SIMILARITY_METRICS)}) and no "
                             "operation" + ("" if self.evaluation_metric is None else "; remove operation"))
        return self


class RLConfig(Section):
    reward_model: str | None = Field(None, description="Run folder of a reward model or classifier used as the reward.")
    grader: GraderConfig | None = Field(None, description="An OpenAI simple grader (string_check, text_similarity) as the reward, reading each prompt's item fields (data.extra_fields=keep); instead of reward_model.")
    reward_label: str | None = Field(None, description="For a classifier reward: the label whose probability is the reward.")
    group_size: int = Field(4, ge=2, description="Completions per prompt (GRPO group / PPO batch per prompt).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per rollout.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling for rollouts.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty against the adapter-disabled reference.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip.")
    value_clip: float = Field(0.2, gt=0, description="PPO value clip.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    ppo_epochs: int = Field(1, ge=1, description="Optimisation passes over each rollout batch.")
    kl_warn: float = Field(10.0, gt=0, description="KL to the reference (nats per completion) above which a still-rising reward triggers a reward-hacking warning.")
    prompt_words: int | None = Field(None, ge=1, description="For text and label records: continue only their first N words (tweet openings, say); None continues the whole text.")

    @model_validator(mode="after")
    def _one_reward(self) -> RLConfig:
        if self.reward_model and self.grader is not None:
            raise ValueError("objective.rl has both reward_model and grader; the reward comes from one of them, so remove the other")
        return self


class ObjectiveConfig(Section):
    kind: Literal["auto", "causal_lm", "classify", "reward", "dpo", "ppo", "grpo"] = Field("auto", description="What the run optimises; auto follows the record kind.")
    class_weights: Literal["none", "balanced"] | list[float] = Field("none", description="classify: per-class loss weights.")
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rl: RLConfig = Field(default_factory=RLConfig)


class EarlyStoppingConfig(Section):
    metric: str = Field("auto", description="Validation metric watched (val_loss, val_accuracy, val_macro_f1, val_reward_mean, ...); auto: the task's own (val_loss; val_reward_mean for grpo and ppo; gemcut/tasks.py).")
    mode: Literal["auto", "min", "max"] = Field("auto", description="Whether lower or higher is better; auto: min for a loss, max for anything else.")
    patience: int | None = Field(None, ge=1, description="Evaluations without improvement before stopping; None disables.")


class FSDPConfig(Section):
    sharding: Literal["full", "grad_op"] = Field("full", description="What FSDP2 shards between uses: full (parameters, gradients and optimizer state; parameters gathered again for the backward), grad_op (parameters stay gathered from forward to backward: more memory, less communication).")
    offload: bool = Field(False, description="Keep sharded parameters and optimizer state in CPU memory between uses (GPU runs whose model does not fit otherwise).")


class DeepSpeedConfig(Section):
    zero_stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.")
    offload: bool = Field(False, description="ZeRO-Offload: optimizer state (and at stage 3 parameters) in CPU memory.")


class DistributedConfig(Section):
    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed"] = Field("auto", description="How processes share the work when the run is launched on several (torchrun or accelerate launch): ddp replicates the model; fsdp2 shards parameters, gradients and optimizer state (torch FSDP2); deepspeed (ZeRO) is refused for now (docs/distributed.md). auto: ddp. One process ignores it.")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    timeout_s: int = Field(600, ge=10, description="Seconds a collective may wait for the other processes before the run stops with an error naming the last good checkpoint (a process that died or hangs).")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step over all processes (the global batch; RL: prompts per iteration). The same config trains the same way on any number of processes.")
    micro_batch_size: int | None = Field(None, ge=1, description="Examples per forward pass on each process; the step's examples are split into micro-batches of this size, dealt round-robin to the processes, and their gradients accumulated. None: the global batch split evenly over the processes (no accumulation).")
    distributed: DistributedConfig = Field(default_factory=lambda: DistributedConfig())
    activation_checkpointing: bool | Literal["selective", "auto"] = Field(False, description="What each decoder block keeps for the backward pass. false: everything (the fastest, the most memory); true: only its input, the block recomputed in the backward pass (the least memory, about a third more compute); selective: the matrix-multiply outputs, with norms and activation functions recomputed (Llama, Mistral, Qwen2/3 decoders: about half the activation memory for a few percent more time; gemcut/models/fast/recompute.py); auto: the fastest of these whose estimated memory fits train.memory_budget_gb. The run's manifest records the plan it ran.")
    memory_budget_gb: float | None = Field(None, gt=0, description="Memory the run may use, in GB, for train.activation_checkpointing=auto to plan within; None: the memory available when the run starts (as the estimate measures it).")
    fast: bool = Field(True, description="The exact speed-ups of gemcut/models/fast/ (padding-free and first-token encoders, cheaper dropout draws); false runs transformers' own forwards, with the same results (docs/models.md).")
    fast_dropout: bool = Field(True, description="Draw dropout masks from 16 random bits per element instead of torch's Bernoulli sampler: the same keep probability (p rounded to 2^-16), about a third of the time per dropout site on a CPU; false restores torch's nn.Dropout (gemcut/models/fast/fast_dropout.py).")
    group_by_length: bool | Literal["auto"] = Field("auto", description="Batch examples of similar length together (less padding); the order stays a seeded shuffle. auto: on, except for a model that runs padding-free (gemcut/models/fast/padding_free.py), which gets uniformly random batches at the same cost.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    layer_lr_decay: float = Field(1.0, gt=0, le=1, description="Layer-wise lr decay: the head and final norm train at lr, the top block at lr*d, each lower block at d times the one above, the embeddings lowest; 1.0 is one rate for all (docs/training.md).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; when None, warmup_ratio of the total.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps used for warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None disables.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Compute precision: auto picks bf16 autocast where the hardware supports it.")
    seed: int = Field(0, description="Seed for model init, data order, dropout and sampling.")
    eval_every: int | None = Field(None, ge=1, description="Steps between validations; None validates at the end only.")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints; None saves at evaluations and the end.")
    keep_last_n: int = Field(2, ge=1, description="Checkpoints kept on disk (the best is kept in addition).")
    log_every: int = Field(1, ge=1, description="Steps between metric lines.")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; None uses all cores.")
    val_max_examples: int | None = Field(500, ge=1, description="Validation examples scored at each evaluation during training (the first N of the split, counted in the report); None scores all. `gemcut eval` always scores whole splits.")
    sample_prompts: int = Field(2, ge=0, description="SFT: validation prompts generated at each evaluation.")
    force: bool = Field(False, description="Start even when the estimate predicts the run will not fit in memory.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"], description="Experiment trackers that get the config and the metrics: tensorboard (tb/), mlflow, wandb (pip install 'gemcut[tracking]'); none or [] for metrics.jsonl only.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        # `train.report_to=none` or `report_to: mlflow` on a command line or in YAML
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _listed_once(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if name in value[:i]:
                raise ValueError(f'"{name}" is listed twice; list each tracker once')
        return value


class EvalConfig(Section):
    split: Literal["validation", "test"] = Field("test", description="Split evaluated by `gemcut eval`.")
    max_new_tokens: int = Field(32, ge=1, description="Generation budget per example.")
    batch_size: int = Field(16, ge=1, description="Examples per generation batch.")
    temperature: float = Field(0.0, ge=0, description="0 is greedy (deterministic).")
    top_p: float = Field(1.0, gt=0, le=1)
    num_samples: int = Field(8, ge=0, description="Side-by-side sample outputs in the report.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many examples (counted in eval.json).")
    compare_base: bool = Field(True, description="Evaluate the base model too, with bootstrap confidence intervals.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals.")
    forgetting_data: str | None = Field("chatterbot", description="General held-out set for the forgetting check (file or packaged alias): perplexity, plus accuracy where its records carry answers (label or prompt/completion); None disables.")
    forgetting_margin: float = Field(0.1, ge=0, description="Warn when general perplexity rises, or general task accuracy falls, by more than this fraction.")
    forgetting_max_examples: int = Field(200, ge=1, description="Conversations of forgetting_data scored (evenly spaced through it).")
    baselines: list[Literal["zero_shot", "k_shot", "tfidf"]] | None = Field(None, description="Baselines scored beside the tuned model (docs/evaluation.md): zero_shot and k_shot prompt the base model, tfidf fits TF-IDF + logistic regression on the train split; None runs all that apply to the task, [] none.")
    k_shot: int = Field(4, ge=1, description="Train examples shown in the prompt of the k_shot baseline (balanced over labels for label tasks).")
    judge: str | None = Field(None, description="A reward-model run folder (objective.kind=reward) that scores the tuned model's answers against each generation baseline's, prompt by prompt (a win rate with its interval); None: no judge.")

    @field_validator("baselines", mode="before")
    @classmethod
    def _no_baselines(cls, value):
        # `eval.baselines=none` on a command line reads as the string "none": no baselines; one name alone is a list of one
        if isinstance(value, str):
            return [] if value.strip().lower() in ("none", "[]", "") else [value.strip()]
        return value

    @field_validator("forgetting_data", "judge", mode="before")
    @classmethod
    def _none_disables(cls, value):
        # `eval.forgetting_data=none` on a command line reads as the string "none"
        return None if isinstance(value, str) and value.strip().lower() in ("none", "null", "") else value


class OutputConfig(Section):
    dir: str = Field("runs", description="Folder that holds run folders.")
    name: str | None = Field(None, description="Run name; default derives from model, objective and time.")


class RunConfig(Section):
    """A whole run: what data, which model, how it is updated, what it optimises, how it trains and is evaluated."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _cross_field_checks(self) -> RunConfig:
        es = self.train.early_stopping
        if es.metric.endswith("loss") and es.mode == "max":
            raise ValueError(f"train.early_stopping: metric {es.metric!r} is a loss but mode is 'max'; set train.early_stopping.mode=min")
        if self.objective.kind != "auto" and TASKS[self.objective.kind].reference and self.adapter.method not in ("lora", "qlora"):
            raise ValueError(f"objective.kind={self.objective.kind} needs adapter.method=lora (the reference is the adapter-disabled model); got {self.adapter.method!r}")
        if self.data.mixture is not None and self.train.group_by_length is True:
            raise ValueError("train.group_by_length=true with data.mixture would fill each batch with one source's examples "
                             "(each source's examples have lengths of their own); a mixture draws uniformly random batches, "
                             "so set train.group_by_length=auto or false")
        # A mixture trains every source as chats: the objective must take chat records as chats (the table's shape).
        if self.data.mixture is not None and self.objective.kind != "auto" and TASKS[self.objective.kind].shapes.get("messages") != "chat":
            raise ValueError(f"data.mixture trains its sources as chats with one causal-LM objective; objective.kind="
                             f"{self.objective.kind} does not train chats that way, so set objective.kind=causal_lm (or auto)")
        if self.objective.kind != "auto" and TASKS[self.objective.kind].rollouts:
            self.data.prompts_only = True  # RL samples the replies: its records are prompts
        return self

    def watched_metric(self, task: Task) -> tuple[str, str]:
        """(metric, mode) that early stopping and the best checkpoint watch: train.early_stopping's, with auto
        resolved to the task's own metric, and an auto mode to min for a loss, max for anything else."""
        es = self.train.early_stopping
        metric = task.metric if es.metric == "auto" else es.metric
        mode = es.mode if es.mode != "auto" else ("min" if metric.endswith("loss") else "max")
        return metric, mode

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading, overrides, errors


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001). Values parse as YAML scalars or flow lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (for example train.lr=1e-4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (it wants 1.0e-4); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return path, value


def set_path(raw: dict, path: tuple[str, ...] | list[str], value: Any) -> None:
    """Set `raw[a][b]... = value` for path (a, b, ...), creating (or replacing non-dict) sections on the way."""
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `a.b=c` in a nested dict, creating sections as needed. Unknown keys are caught at validation."""
    for text in overrides:
        set_path(raw, *parse_override(text))
    return raw


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        # A section that may be absent (`grader: GraderConfig | None`) lists the keys of the section.
        annotation = next((a for a in getattr(field.annotation, "__args__", ()) if a is not type(None)), None) if field else None
        annotation = field.annotation if field is not None and isinstance(field.annotation, type) else annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


# Keys that gemcut once had, with what to write instead.
REPLACED = {("train", "grad_accum"): "train.grad_accum is gone: train.batch_size is now the whole step's batch over all "
                                     "processes; write train.batch_size=<old batch_size x grad_accum> and "
                                     "train.micro_batch_size=<old batch_size>"}


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem: field path, what was given, what is allowed, and a did-you-mean."""
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"])
        dotted = ".".join(str(x) for x in loc) or "(root)"
        given = e.get("input")
        if e["type"] == "extra_forbidden" and loc in REPLACED:
            lines.append(f"{source}: {REPLACED[loc]}")
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_keys(RunConfig, loc)
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join(str(x) for x in loc[:-1] + (near[0],))!r}?" if near else ""
            lines.append(f"{source}: unknown key {dotted!r}{hint} Allowed here: {', '.join(allowed)}")
        else:
            msg = e["msg"]
            lines.append(f"{source}: {dotted}: {msg} (given: {given!r})")
    return "\n".join(lines)


def validate(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file (or start from defaults), apply overrides, validate once."""
    raw: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        source = str(p)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a run config is a mapping of sections (data, model, ...), got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source)


def json_schema() -> dict:
    return RunConfig.model_json_schema()
