"""The training layer: `fit` (the loop), checkpoints, schedule, logging, and `run.train` (a whole run).

    gemcut train examples/sft_chatterbot.yaml

`gemcut.train(config)` is documented as a function (gemcut/__init__.py), but importing any module of this
package rebinds the attribute `gemcut.train` to this package. So the package itself is callable and runs
`gemcut.train.run.train`: `gemcut.train(config)` works whichever of the two the name points at.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, config, **kwargs):
        from gemcut.train.run import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
