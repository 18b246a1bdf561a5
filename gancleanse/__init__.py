"""gancleanse: find the training instances that make a GAN worse, remove them, retrain, and check.

The Python API mirrors the command line::

    import gancleanse as gc
    run = gc.train(gc.load_config("gaussian2d.toml"), "runs/g2d")
    scores = gc.influence(run, metric="all", method="itd")
    print(scores.most_harmful(10))
    print(gc.counterfactual(run, remove=[3, 17], metric="all"))
"""

from __future__ import annotations

# The subpackage gancleanse.influence is imported first: importing a subpackage binds it as an
# attribute of the package, so the function gc.influence must be bound after it, not before.
from . import influence as _influence_package  # noqa: F401
from .api import Scores, cleanse, counterfactual, counterfactuals, export, influence, lds, train, validate
from .config import Config, load_config
from .data import Splits
from .errors import GancleanseError
from .models import GANModules
from .models.lora import lora
from .options import AIDOptions, IsolationForestOptions, ITDOptions, KNNOptions
from .run import Run
from .version import __version__

__all__ = ["AIDOptions", "Config", "GANModules", "GancleanseError", "ITDOptions", "IsolationForestOptions",
           "KNNOptions", "Run", "Scores", "Splits", "cleanse", "counterfactual", "counterfactuals", "export",
           "influence", "lds", "lora", "load_config", "train", "validate", "__version__"]
