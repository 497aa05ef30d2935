"""gemcut: self-hosted fine-tuning of language models.

    from gemcut import load_config, run_training
    run_dir = run_training(load_config("examples/sft_chatterbot.yaml"))

The package root is the Python API's front door and imports the entry points, so nothing inside gemcut
imports it (lower layers read the version from gemcut/version.py). `run_training` is not called `train`
because `gemcut.train` is the training package: importing any of its modules binds that name to it.
"""

from gemcut.config import RunConfig, load_config
from gemcut.version import __version__

__all__ = ["RunConfig", "load_config", "run_training", "evaluate", "__version__"]


def run_training(config: RunConfig, **kwargs):
    """Run a whole training run and return its run folder (see gemcut.train.run.train)."""
    from gemcut.train.run import train

    return train(config, **kwargs)


def evaluate(run_dir, **kwargs):
    """Evaluate a run folder; returns the eval.json contents (see gemcut.eval.evaluate)."""
    from gemcut.eval.evaluate import evaluate as evaluate_run

    return evaluate_run(run_dir, **kwargs)
