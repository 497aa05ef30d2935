#!/usr/bin/env bash
# The test command: set-up, lint (ruff, including undefined names), then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check gemcut tests bench
python -m pytest -q "$@"
