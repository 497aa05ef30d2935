"""Hyperparameter sweeps on Optuna: each trial an ordinary run folder, the study in gemcut's database,
pruning on the validation metric as the run reports it. See docs/sweeps.md."""
