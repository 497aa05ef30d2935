"""Settings of a running server: what it serves, where it listens, who may call it, what it records.

    gemcut serve --model runs/my-run --port 8000          # flags fill these fields
    gemcut serve --config serve.yaml                      # or a YAML file with the same keys

These are not part of a run's config (a server serves several runs), so they live here. API keys come
from the `GEMCUT_API_KEYS` environment variable (comma-separated) and/or `api_keys`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gemcut.errors import ConfigError

API_KEYS_ENV = "GEMCUT_API_KEYS"


class ServeSettings(BaseModel):
    """Everything `create_app` needs; every field is also a `gemcut serve` option or a YAML key."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())

    models: list[str] = Field(default_factory=list, description="Run folders, exported folders or model names to serve; the first is the default.")
    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless you mean to expose the server.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Further names clients reach the server by (Host header); others get 400. Loopback names and the bound address are always allowed.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted (8 MiB, far above any context); "
                                "a bigger one gets 413 before it is read.")
    api_keys: list[str] = Field(default_factory=list, description=f"Bearer keys accepted, in addition to those in ${API_KEYS_ENV}.")
    db_url: str = Field("sqlite:///runs/serve.db", description="SQLAlchemy URL of the request log and feedback store.")
    log_prompts: bool = Field(False, description="Store prompt and response text in the request log (needed for drift and data export). Off by default: prompts may hold personal data.")
    log_retention_days: float = Field(30.0, gt=0, description="Request-log rows older than this are deleted.")
    max_queue: int = Field(64, ge=1, description="Requests waiting for the model; beyond this the server answers 429.")
    max_batch: int = Field(8, ge=1, description="Most sequences decoding together; a new request joins the running ones at the next step while there is room.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long an idle worker waits for more requests before it starts a batch.")
    max_batch_tokens: int = Field(8192, ge=1, description="Classifier and embedding forward passes hold at most this many tokens (rows x longest row); more are split across passes.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request) accepted.")
    default_max_tokens: int = Field(256, ge=1, description="Completion budget when a request gives no max_tokens (clipped to the context).")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads for the worker; None leaves torch's default.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.")
    trust_remote_code: bool = Field(False, description="Run Python files shipped in a served folder (its config.json auto_map). Off: a folder never turns it on itself.")

    @field_validator("api_keys")
    @classmethod
    def _no_blank_keys(cls, keys: list[str]) -> list[str]:
        if any(not k.strip() for k in keys):
            raise ValueError("api_keys holds an empty key; remove it")
        return [k.strip() for k in keys]

    def all_api_keys(self) -> set[str]:
        """Keys from the settings plus those in $GEMCUT_API_KEYS (read now, so tests and shells can set it)."""
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return set(self.api_keys) | set(env)


def load_settings(path: str | Path | None = None, *, cls: type[ServeSettings] = ServeSettings, **overrides) -> ServeSettings:
    """Read a YAML settings file (optional) and apply keyword overrides that are not None, into `cls` (the
    fine-tuning service's settings extend these)."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such serve settings file")
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: serve settings are a mapping of keys (models, host, port, ...), got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path or 'serve settings'}: {'.'.join(map(str, e['loc']))}: {e['msg']} (given: {e.get('input')!r})" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None
