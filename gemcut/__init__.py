"""gemcut: self-hosted fine-tuning of language models.

    from gemcut import load_config, train
    run_dir = train(load_config("examples/sft_chatterbot.yaml"))
"""

from gemcut.config import RunConfig, load_config

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "train", "evaluate", "__version__"]


def train(config: RunConfig, **kwargs):
    """Run a whole training run and return its run folder (see gemcut.train.run)."""
    from gemcut.train.run import train as _train

    return _train(config, **kwargs)


def evaluate(run_dir, **kwargs):
    """Evaluate a run folder; returns the eval.json contents (see gemcut.eval.evaluate)."""
    from gemcut.eval.evaluate import evaluate as _evaluate

    return _evaluate(run_dir, **kwargs)
