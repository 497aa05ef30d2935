"""gemcut's version, in one place: the package metadata (pyproject.toml reads it) and every file gemcut writes.

    python -c "from gemcut.version import __version__; print(__version__)"

Its own module so that a lower layer (the run-folder writer, gemcut/models/load.py) can stamp the version
without importing the package root, which imports the training and evaluation entry points.
"""

__version__ = "0.1.0"
