"""The training layer: `fit` (the loop), checkpoints, schedule, logging, and `run.train` (a whole run).

    gemcut train examples/sft_chatterbot.yaml
    python -c "from gemcut import load_config, run_training; run_training(load_config('examples/sft_chatterbot.yaml'))"
"""
