"""The models layer: resolve a name, load a base model or a run, adapters, heads, and the speed tricks.

    gemcut models
    python -m pytest -q tests/test_models_load.py

It sits below training (it reads the run-folder format from gemcut/run_folder.py, never gemcut/train/) and
above the data layer.
"""
