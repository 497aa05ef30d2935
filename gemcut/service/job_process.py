"""A job's child processes (`gemcut train`, `gemcut eval`): started so that they die with their worker.

    python -m pytest -q tests/test_service_workers.py

    child = start_child([sys.executable, "-m", "gemcut", "train", "job_config.yaml"], log=run_dir / "job.log")
    child.wait(timeout=1.0)

On Linux each child asks the kernel for SIGKILL when its parent goes (prctl PR_SET_PDEATHSIG), so a worker
killed with SIGKILL leaves no training process behind to race the worker that takes the job over. The kernel
sends it when the *thread* that forked the child exits, so the thread that starts a child must be the one that
waits for it (each job's runner thread does both). Children get a session of their own: a Ctrl-C in the
worker's terminal reaches the worker alone, which then stops its jobs at a step boundary (SIGTERM).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    """The child's pre-exec step: SIGKILL when the forking thread's process ends (or has already ended)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def arrange() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(137)

    return arrange


def start_child(command: list[str], *, log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` with its stdout and stderr appended to `log`; it dies with this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))


def wait_for(child: subprocess.Popen, timeout: float) -> int | None:
    """The child's exit status after at most `timeout` seconds, or None while it runs (negative: killed by
    that signal)."""
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
