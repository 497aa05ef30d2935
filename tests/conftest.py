import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub; everything they load is built in the test or packaged.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # `from tiny import ...`



@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on loopback for the session (tests/postgres_server.py), as a SQLAlchemy URL;
    skipped where Debian's postgresql binaries are not installed."""
    from postgres_server import MISSING, postgres_bin_dir, running_postgres

    if postgres_bin_dir() is None:
        pytest.skip(MISSING)
    with running_postgres() as url:
        yield url
