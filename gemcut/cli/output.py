"""What the `gemcut` command prints besides its own results: gemcut's log lines, and the libraries' noise.

By default the libraries are quiet: no transformers/huggingface_hub progress bars for each load ("Loading
weights"), no load-report tables (gemcut logs one line instead, gemcut/models/load.py), no FutureWarning or
DeprecationWarning from a library's deprecated call. `gemcut --verbose` brings all of them back and adds
gemcut's debug lines. Set before any library is imported: both libraries read their switches at import.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def configure_output(verbose: bool) -> None:
    """gemcut's log lines to stderr (info, or debug with `verbose`); libraries quiet unless `verbose`."""
    logger = logging.getLogger("gemcut")
    if not any(getattr(h, "gemcut_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.gemcut_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # one copy of each line, not a second one from a root handler
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
