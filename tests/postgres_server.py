"""A throwaway PostgreSQL server for the tests: Debian's `postgresql` binaries, a temporary data directory,
loopback only, stopped and removed at the end.

    python -m pytest -q tests/test_service_queue.py -k postgres     # uses the `postgres_url` fixture (conftest.py)

    with running_postgres() as url:       # postgresql+psycopg://postgres@127.0.0.1:PORT/gemcut_test
        engine = make_engine(url)

The server listens on 127.0.0.1 on a free port, its unix socket inside the temporary directory, with `trust`
authentication (nothing but this machine's loopback can reach it). initdb refuses to run as root, so as root
(CI) every server command runs as the `postgres` user (`runuser -u postgres --`), which owns the directory.
fsync is off: the tests never need the data to survive a crash of the machine.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

DATABASE = "gemcut_test"


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, or None (not installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    for initdb in reversed(found):
        folder = Path(initdb).parent
        if (folder / "pg_ctl").is_file():
            return folder
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server in `root` (a fresh temporary directory), started by `start()`, removed by `stop()`."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="gemcut-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        if self.as_root:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}")

    def start(self) -> str:
        """Start the server and create the test database; returns its SQLAlchemy URL."""
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "--encoding=UTF8", "--no-locale")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


MISSING = ("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); install Debian's postgresql package "
           "(scripts/setup.sh does, as root) to run the PostgreSQL tests")


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """A started server's URL for the duration of the block (see the module docstring)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError(MISSING)
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()
