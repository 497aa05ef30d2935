"""Where the service keeps its files: one folder, shared by every worker (a network file system for workers
on several machines), holding the uploaded files and one run folder per job.

    layout = ServiceLayout(Path("~/.cache/gemcut/service"))
    layout.file_path("file-abc")   # <root>/files/file-abc      the uploaded bytes, named by id only
    layout.run_dir("ftjob-abc")    # <root>/runs/ftjob-abc      an ordinary gemcut run folder

Paths are built from ids the service made itself (`new_id`), never from a client's file name or path, so no
request can name a place on the file system.
"""

from __future__ import annotations

import re
from pathlib import Path

from gemcut.errors import GemcutError
from gemcut.home import gemcut_home

ID_PATTERN = re.compile(r"^[a-z]+-[A-Za-z0-9_-]{8,40}$")


def default_root() -> Path:
    return gemcut_home() / "service"


class ServiceLayout:
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    def ensure(self) -> ServiceLayout:
        for folder in (self.root, self.files_dir, self.runs_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def default_db_url(self) -> str:
        return f"sqlite:///{self.root / 'service.db'}"

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / checked_id(file_id)

    def run_dir(self, job_id: str) -> Path:
        return self.runs_dir / checked_id(job_id)


def checked_id(value: str) -> str:
    """`value` when it has the shape of an id this service makes; anything else (`..`, `/`) is refused."""
    if not ID_PATTERN.match(value):
        raise GemcutError(f"{value!r} is not an id this service made")
    return value
