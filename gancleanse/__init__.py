"""gancleanse: find the training instances that make a GAN worse, remove them, retrain, and check.

The Python API mirrors the command line::

    import gancleanse as gc
    run = gc.train(gc.load_config("gaussian2d.toml"), "runs/g2d")
    scores = gc.influence(run, metric="all", method="itd")
    print(scores.most_harmful(10))
    print(gc.counterfactual(run, remove=[3, 17], metric="all"))
"""

from __future__ import annotations

from .version import __version__  # noqa: E402

from .api import Scores, cleanse, counterfactual, counterfactuals, export, influence, lds, train, validate  # noqa: E402
from .data import Splits  # noqa: E402
from .models import GANModules  # noqa: E402
from .models.lora import lora  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .errors import GancleanseError  # noqa: E402
from .run import Run  # noqa: E402

__all__ = ["Config", "GANModules", "GancleanseError", "Run", "Scores", "Splits", "cleanse", "counterfactual", "counterfactuals",
           "export", "influence", "lds", "lora",
           "load_config", "train", "validate", "__version__"]
