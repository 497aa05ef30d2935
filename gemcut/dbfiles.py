"""SQLite files that only their owner can read.

The request log, feedback and labeling databases hold prompts, answers and rankings: personal data. A
file SQLite creates takes the process umask (usually 0644, readable by every account on the machine), so
the file is made 0600 before SQLite opens it; SQLite gives its -wal and -shm files the permissions of the
database file. A file that already exists and is readable by others is tightened to 0600 too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLAlchemy SQLite URL (`sqlite:///runs/serve.db`), or None (memory, other databases)."""
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path).expanduser()


def make_private(url: str) -> None:
    """Create the SQLite file of `url` (and its folder) readable by its owner only; others URLs pass through."""
    path = sqlite_path(url)
    if path is None:
        return
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if f.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                os.chmod(f, 0o600)
        except (FileNotFoundError, PermissionError):  # absent, or another account's file: not ours to change
            continue
