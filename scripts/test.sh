#!/usr/bin/env bash
# The test command: set-up, lint (ruff, including undefined names), the layer contracts (lint-imports, the
# [tool.importlinter] contracts in pyproject.toml), then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check gemcut tests bench
lint-imports
python -m pytest -q "$@"
