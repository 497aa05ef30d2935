"""Serving: an OpenAI-compatible HTTP API over loaded runs, feedback, metrics and the monitor.

    gemcut serve --model runs/my-run
    python -m pytest -q tests/test_serve_api.py
"""
