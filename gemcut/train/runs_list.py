"""What is in a folder of runs: one row per run folder, read from the files a run leaves (no model loaded).

    gemcut runs [runs] [--json]

A row: name, task, base model, status, steps done (of the planned), the evaluation headline, size on disk.
Status: how `manifest.json` says the run ended (`completed`, `early_stopped`, `collapsed`, ...) when it
finished; `unfinished` when it has checkpoints but no manifest (`gemcut train ... --resume` continues it,
or it is running now); `not started` when it has neither.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from gemcut.run_folder import latest_checkpoint


@dataclass
class RunRow:
    name: str
    task: str
    base: str
    status: str
    steps: int | None
    max_steps: int | None
    headline: str | None
    bytes: int
    path: str

    def to_dict(self) -> dict:
        return asdict(self)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or half-written: the row says what is known
    return data if isinstance(data, dict) else {}


def _yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def run_row(run_dir: Path) -> RunRow:
    """The row of one run folder."""
    config, meta = _yaml(run_dir / "config.yaml"), _json(run_dir / "gemcut_run.json")
    manifest, evaluation = _json(run_dir / "manifest.json"), _json(run_dir / "eval.json")
    latest = latest_checkpoint(run_dir / "checkpoints")
    if manifest:
        status, steps = str(manifest.get("stopped", "completed")), manifest.get("steps")
    elif latest is not None:
        status, steps = "unfinished", int(latest.name.split("-", 1)[1])
    else:
        status, steps = "not started", None
    task = meta.get("task") or manifest.get("task") or (config.get("objective") or {}).get("kind") or "?"
    base = meta.get("base_model") or (config.get("model") or {}).get("name") or "?"
    return RunRow(name=run_dir.name, task=task, base=base, status=status, steps=steps,
                  max_steps=(config.get("train") or {}).get("max_steps"), headline=evaluation.get("headline"),
                  bytes=_bytes_on_disk(run_dir), path=str(run_dir))


def list_runs(root: str | Path = "runs") -> list[RunRow]:
    """Every run folder directly under `root` (a folder with a config.yaml), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    folders.sort(key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)
    return [run_row(p) for p in folders]
