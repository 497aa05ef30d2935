"""Resolve a model name to something `from_pretrained` can open, offline first.

    gemcut models
    python -c "from gemcut.models.resolve import resolve_model; print(resolve_model('minilm-l6'))"

A name is tried, in order, as:
1. an alias of a packaged model (`gemcut/models/registry.py`); a GGUF alias is converted once into
   `$GEMCUT_HOME/models/<alias>/` (default `~/.cache/gemcut`);
2. a run folder of `gemcut train` (config.yaml, final/): its weights, an adapter merged into its base
   once (`gemcut/models/run_base.py`), so one run can start from another (SFT -> DPO);
3. a local folder with a `config.json`;
4. a hub id (`owner/name`), returned as is only when it is already in the Hugging Face cache or a hub is
   reachable (never when `HF_HUB_OFFLINE=1`).
Anything else is a `ModelNotFoundError` that lists every place gemcut looked and the package to install.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from urllib.parse import urlparse

from gemcut.errors import ModelNotFoundError
from gemcut.home import gemcut_home
from gemcut.models.registry import ALIASES, Alias, alias_source


def converted_dir(alias: Alias) -> Path:
    return gemcut_home() / "models" / alias.name


def _resolve_alias(alias: Alias) -> Path:
    source = alias_source(alias)
    if source is None:
        raise ModelNotFoundError(
            f"model alias {alias.name!r} needs the package {alias.pip_name!r}, which is not installed; "
            f"install it with: {alias.install_hint}"
        )
    if alias.kind == "folder":
        return source
    from gemcut.models.gguf import convert_gguf

    return convert_gguf(source, converted_dir(alias))


def _hf_cache_has(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # malformed ids raise validation errors; they are simply not in the cache
        return False
    return isinstance(found, str)


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return str(Path.home() / ".cache" / "huggingface" / "hub")


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A TCP connection to the hub endpoint, unless the user (or the tests) said to stay offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    if os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def resolve_model(name: str, revision: str | None = None) -> Path | str:
    """A local folder (Path) for an alias or a folder, or the hub id (str) when the hub or its cache has it.

    Raises ModelNotFoundError naming the aliases, the path and the HF cache it checked.
    """
    if name in ALIASES:
        return _resolve_alias(ALIASES[name])
    path = Path(name).expanduser()
    if path.is_dir():
        from gemcut.models.run_base import is_run_folder, run_weights

        if is_run_folder(path):
            return run_weights(path, resolve_model).resolve()
        if path.name == "final" and is_run_folder(path.parent) and not (path / "config.json").is_file():
            return run_weights(path.parent, resolve_model).resolve()  # a LoRA run's final/ holds only the adapter
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path}: the folder exists but has no config.json, so it is not a transformers model folder "
                "(it needs config.json, model.safetensors and the tokenizer files)"
            )
        return path.resolve()
    if path.is_file() and path.suffix == ".gguf":
        return convert_local_gguf(path)
    reachable = False
    if _looks_like_hub_id(name):
        if _hf_cache_has(name, revision):
            return name
        reachable = _hub_reachable()
        if reachable:
            return name
    aliases = ", ".join(f"{a.name} ({a.install_hint})" for a in ALIASES.values())
    raise ModelNotFoundError(
        f"model {name!r} not found. gemcut looked for: an alias (known: {aliases}); "
        f"a local folder at {path.resolve()} (does not exist); "
        f"the Hugging Face cache at {_hf_cache_dir()} (no {name!r} there); "
        f"and the hub ({'not reachable or HF_HUB_OFFLINE=1' if not reachable else 'reachable'}). "
        "Use an alias, a folder with config.json, or download the model on a connected machine."
    )


def convert_local_gguf(path: Path) -> Path:
    """A user's own .gguf file is converted like the packaged one, cached by file name."""
    from gemcut.models.gguf import convert_gguf

    return convert_gguf(path, gemcut_home() / "models" / f"gguf-{path.stem}")


# ---------------------------------------------------------------- listing


def safetensors_parameter_count(folder: Path) -> int | None:
    """Parameters in a folder's *.safetensors files, from their headers only (no tensor is read)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


def _cached_gguf_count(gguf_path: Path) -> int:
    """GGUF parameter counts take seconds to read; remember them by file identity."""
    cache = gemcut_home() / "models" / "gguf_parameters.json"
    st = gguf_path.stat()
    key = f"{gguf_path}:{st.st_size}:{int(st.st_mtime)}"
    known = {}
    if cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except json.JSONDecodeError:
            known = {}
    if key not in known:
        from gemcut.models.gguf import gguf_parameter_count

        known[key] = gguf_parameter_count(gguf_path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    return known[key]


def list_local_models() -> list[dict]:
    """What `gemcut models` shows: each alias (installed or not), converted folders, and the HF cache.

    Each entry: name, path (None when missing), parameters (None when unknown), source, status.
    """
    from gemcut.models.gguf import is_converted

    rows: list[dict] = []
    seen: set[str] = set()
    for alias in ALIASES.values():
        source = alias_source(alias)
        row = {"name": alias.name, "path": None, "parameters": None, "source": f"package {alias.pip_name}",
               "status": f"not installed ({alias.install_hint})", "description": alias.description}
        if source is not None and alias.kind == "folder":
            row |= {"path": str(source), "parameters": safetensors_parameter_count(source), "status": "ready"}
        elif source is not None:
            out = converted_dir(alias)
            if is_converted(out, source):
                row |= {"path": str(out), "parameters": safetensors_parameter_count(out), "status": "ready (converted)"}
            else:
                row |= {"path": str(source), "parameters": _cached_gguf_count(source),
                        "status": "installed; converted to safetensors on first use"}
        rows.append(row)
        seen.add(row["path"] or "")
    models_dir = gemcut_home() / "models"
    if models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            if folder.is_dir() and not folder.name.startswith(".") and folder.name not in ALIASES \
                    and (folder / "config.json").is_file():
                rows.append({"name": str(folder), "path": str(folder), "parameters": safetensors_parameter_count(folder),
                             "source": "gemcut home", "status": "ready", "description": ""})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type != "model":
                continue
            snapshot = max(repo.revisions, key=lambda r: r.last_modified, default=None)
            path = Path(snapshot.snapshot_path) if snapshot else None
            rows.append({"name": repo.repo_id, "path": str(path) if path else None,
                         "parameters": safetensors_parameter_count(path) if path else None,
                         "source": "Hugging Face cache", "status": "ready", "description": ""})
    except Exception:  # no cache folder, or an unreadable one: nothing cached to list
        pass
    return rows


def format_parameters(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
