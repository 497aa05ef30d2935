"""A sweep's search space: a YAML file of dotted config keys, each with a range or a list of values.

    python -m pytest -q tests/test_sweep.py -k space

    space = load_space("examples/sweeps/sweep_space.yaml", base_raw)   # checked against RunConfig, or a ConfigError
    overrides = space.suggest(trial)                                 # {"train.lr": 3.1e-4, "adapter.method": "lora"}

The file, in the conventions of Optuna, Ray Tune and W&B sweeps:

    train.lr: {low: 1e-5, high: 1e-3, log: true}       # a float range, sampled on a log scale
    train.warmup_ratio: {low: 0.0, high: 0.2}          # a float range
    train.max_steps: {low: 100, high: 400, step: 100}  # integers when low and high are integers
    train.batch_size: {values: [16, 32]}               # one of a list
    adapter.method: {values: [lora, full]}
    adapter.r: {values: [8, 16], when: {adapter.method: lora}}   # sampled only when adapter.method is lora

A key with `when` is sampled only in trials where each named key (defined above it in the file) took the
given value (or one of a list of values); otherwise the config's own value stands. Every key, range end and
listed value is validated against RunConfig on top of the base config before the first trial, with the
config's own error lines, prefixed with the space file and the key's line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from gemcut.config import RunConfig, apply_overrides, format_validation_error
from gemcut.errors import ConfigError

SPEC_KEYS = ("low", "high", "log", "step", "values", "when")


@dataclass(frozen=True)
class Param:
    """One swept key: a range (`low`, `high`, `log`, `step`) or a list (`values`), sampled when `when` holds."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    values: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)
    where: str = "space"  # the file and the key's line, for errors

    @property
    def is_int(self) -> bool:
        return all(isinstance(x, int) and not isinstance(x, bool) for x in (self.low, self.high)) and (
            self.step is None or isinstance(self.step, int))

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.values:
            return optuna.distributions.CategoricalDistribution(list(self.values))
        if self.is_int:
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def corners(self) -> list:
        """The values that stand for the whole range when the config checks it: each listed value, or both ends."""
        return list(self.values) if self.values else [self.low, self.high]

    def applies(self, chosen: dict[str, Any]) -> bool:
        return all(chosen.get(key, _ABSENT) in allowed for key, allowed in self.when.items())


_ABSENT = object()


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = "space"

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """This trial's value of each key whose `when` holds, in file order (conditions are sampled first)."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.applies(chosen):
                chosen[p.key] = _suggest(trial, p)
        return chosen

    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def _suggest(trial: optuna.Trial, p: Param) -> Any:
    if p.values:
        return trial.suggest_categorical(p.key, list(p.values))
    if p.is_int:
        return trial.suggest_int(p.key, p.low, p.high, log=p.log, step=p.step or 1)
    return trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log, step=p.step)


def as_override(key: str, value: Any) -> str:
    """`key=value` in the form `gemcut train` parses back to the same value (YAML flow scalars)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    if text.endswith("\n...") or text.endswith("..."):
        text = text.rsplit("...", 1)[0].strip()
    return f"{key}={text}"


def _number(value: Any) -> Any:
    # YAML 1.1 reads 1e-5 as a string (it wants 1.0e-5); numbers are what people mean.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _key_lines(text: str) -> dict[str, int]:
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}


def parse_space(path: str | Path) -> SearchSpace:
    """The space file as Params, its shape checked (not yet its values against the config)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such search space file")
    text = p.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{p}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: a search space is a mapping of dotted config keys to ranges or values, e.g. "
                          "train.lr: {low: 1e-5, high: 1e-3, log: true}")
    lines = _key_lines(text)
    params: list[Param] = []
    for key, spec in raw.items():
        where = f"{p}:{lines[str(key)]}" if str(key) in lines else str(p)
        params.append(_param(str(key), spec, where, params, [str(k) for k in raw]))
    return SearchSpace(tuple(params), str(p))


def _param(key: str, spec: Any, where: str, params: list[Param], all_keys: list[str]) -> Param:
    """One key's spec as a Param; `params` are the keys above it (the only ones a `when` may name)."""
    def bad(message: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {message}")

    if not isinstance(spec, dict):
        raise bad(f"give a range {{low: .., high: ..}} or a list {{values: [..]}}, not {spec!r}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; a key takes {', '.join(SPEC_KEYS)}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise bad(f"when is a mapping of earlier keys to values, e.g. when: {{adapter.method: lora}}; got {when!r}")
    conditions: dict[str, tuple] = {}
    for other, allowed in when.items():
        other = str(other)
        if other not in [q.key for q in params]:
            hint = ("define it above this key" if other in all_keys else
                    "it is not a key of this space; add it, with its values, above this key")
            raise bad(f"when names {other!r}: {hint}")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        source = next(q for q in params if q.key == other)
        if source.values and any(a not in source.values for a in allowed):
            raise bad(f"when {other}: {list(allowed)} names a value {other} never takes (its values: {list(source.values)})")
        conditions[other] = allowed
    if "values" in spec:
        extra = [k for k in ("low", "high", "log", "step") if k in spec]
        if extra:
            raise bad(f"give either values or a range (low, high), not both; remove {', '.join(extra)}")
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise bad(f"values must be a non-empty list, e.g. values: [16, 32]; got {values!r}")
        values = [_number(v) if isinstance(v, str) and v[:1].isdigit() else v for v in values]
        for v in values:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise bad(f"each value must be a number, a string, true/false or null (Optuna stores them); got {v!r}")
        return Param(key, values=tuple(values), when=conditions, where=where)
    if "low" not in spec or "high" not in spec:
        raise bad("a range needs both low and high (or give values: [...])")
    low, high, step = _number(spec["low"]), _number(spec["high"]), _number(spec.get("step"))
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(f"{name} must be a number; got {v!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise bad(f"log is true or false; got {log!r}")
    if low > high:
        raise bad(f"low {low} > high {high}; swap them")
    if log and low <= 0:
        raise bad(f"a log range needs low > 0; got low {low}")
    if log and step is not None:
        raise bad("a log range takes no step; remove step or log")
    if step is not None and step <= 0:
        raise bad(f"step must be > 0; got {step}")
    return Param(key, low=low, high=high, log=log, step=step, when=conditions, where=where)


def check_space(space: SearchSpace, base_raw: dict, base_source: str) -> None:
    """Validate the base config alone, then each key's range ends and values on top of it: a ConfigError in
    the config's words, prefixed with the space file, when one is not a valid setting."""
    try:
        RunConfig.model_validate(copy.deepcopy(base_raw))
    except Exception as err:  # pydantic's ValidationError: the base config's own fault, named as such
        raise ConfigError(format_validation_error(err, base_source)) from None
    for p in space.params:
        for value in p.corners():
            raw = apply_overrides(copy.deepcopy(base_raw), [as_override(p.key, value)])
            try:
                RunConfig.model_validate(raw)
            except Exception as err:
                raise ConfigError(f"{format_validation_error(err, p.where)} (search space key {p.key}, value {value!r})") from None


def load_space(path: str | Path, base_raw: dict, base_source: str = "config") -> SearchSpace:
    """parse_space + check_space."""
    space = parse_space(path)
    check_space(space, base_raw, base_source)
    return space
