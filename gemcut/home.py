"""Where gemcut keeps its own files: converted models, derived data sets, the label database.

    python -c "from gemcut.home import gemcut_home; print(gemcut_home())"

`$GEMCUT_HOME`, default `~/.cache/gemcut`. Its own module, at the bottom of the layers, because the data
layer (gemcut/data/derived.py), the models layer (gemcut/models/resolve.py) and the label store all keep
files there and none of them may import the others for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def gemcut_home() -> Path:
    """Where gemcut keeps converted models and caches: `$GEMCUT_HOME`, default `~/.cache/gemcut`."""
    env = os.environ.get("GEMCUT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemcut"
