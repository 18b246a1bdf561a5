"""Feature spaces: the frozen networks that IS, FID and KID (and precision/recall) see images through.

One module per space, chosen by ``[metric] features`` (``--features``):

- ``classifier``: the small CNN trained on the run's labelled training split (the paper's MNIST protocol);
- ``inception``: the Inception-v3 network of the FID standard, from the published weights file;
- ``self_supervised``: a small encoder trained here on the training split without labels (offline, any
  folder); its Frechet distance is "FD (self-supervised encoder)", not comparable with published FID;
- ``torchscript``: the user's TorchScript file (``metric.extractor``);
- ``auto``: torchscript when an extractor is named, else classifier for labelled images, else inception when
  its weights are found, else self_supervised.

``resolve`` says which space a run's metrics use and why; ``load_feature_model`` returns it as a
``FeatureModel``. Nothing here downloads: the Inception weights come from a file (``gancleanse weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ConfigError
from ..specs import FEATURE_CHOICES, FEATURE_SPACES
from .base import FeatureModel

if TYPE_CHECKING:
    from ..run import Run


@dataclass(frozen=True)
class Choice:
    """The feature space a run's metrics use, and why (printed and recorded)."""

    space: str
    reason: str


def check_space(space: str) -> str:
    if space not in FEATURE_CHOICES:
        raise ConfigError(f"unknown feature space {space!r} (known: {', '.join(FEATURE_CHOICES)})")
    return space


def requested(run: "Run") -> str:
    """The space asked for: ``Run.open(features=...)`` / ``--features``, else ``[metric] features``."""
    return check_space(run.features or run.cfg.metric.features)


def _images(run: "Run") -> bool:
    return run.splits.train.ndim == 4


def _labelled_images(run: "Run") -> bool:
    splits = run.splits
    return _images(run) and splits.y_train is not None and min(splits.sample_shape[1:]) >= 4


def resolve(run: "Run") -> Choice | None:
    """The run's feature space, or None where there is none (2D points without an extractor)."""
    space = requested(run)
    if space != "auto":
        return Choice(space, "asked for")
    if run.extractor or run.cfg.metric.extractor:
        return Choice("torchscript", "auto: metric.extractor is set")
    if not _images(run):
        return None
    if _labelled_images(run):
        return Choice("classifier", "auto: the training images are labelled")
    from .inception import find_weights

    found = find_weights(run.cfg.metric.weights)
    if found is not None:
        return Choice("inception", f"auto: unlabelled images, Inception weights found at {found}")
    return Choice("self_supervised", "auto: unlabelled images and no Inception weights file found")


def usable_space(run: "Run") -> str | None:
    """The run's feature space where its network can load (``resolve`` not None; with ``torchscript`` the
    extractor must have been named at ``open``), else None."""
    choice = resolve(run)
    if choice is None:
        return None
    if choice.space == "torchscript":
        usable = bool(run.extractor)
    elif choice.space == "classifier":
        usable = _labelled_images(run)
    else:
        usable = _images(run)
    return choice.space if usable else None


def has_features(run: "Run") -> bool:
    """Whether the run's metrics have a feature space whose network can load (``usable_space``)."""
    return usable_space(run) is not None


def _load_classifier(run: "Run") -> FeatureModel:
    from .classifier import load_or_train_classifier

    return load_or_train_classifier(run)


def _load_torchscript(run: "Run") -> FeatureModel:
    from .torchscript import extractor_file, load_extractor

    path = extractor_file(run)
    if path is None:
        raise ConfigError("features = torchscript needs metric.extractor (a TorchScript file), named explicitly "
                          "(--extractor FILE, or Run.open(path, extractor=...))")
    return load_extractor(path, run.splits.sample_shape)


def _load_inception(run: "Run") -> FeatureModel:
    from .inception import load_for_run

    return load_for_run(run)


def _load_self_supervised(run: "Run") -> FeatureModel:
    from .self_supervised import load_or_train_encoder

    return load_or_train_encoder(run)


LOADERS: dict[str, Callable[["Run"], FeatureModel]] = {
    "classifier": _load_classifier, "inception": _load_inception,
    "self_supervised": _load_self_supervised, "torchscript": _load_torchscript}
assert tuple(LOADERS) == FEATURE_SPACES


def load_feature_model(run: "Run", space: str | None = None) -> FeatureModel:
    """The network of ``space`` (default: the run's resolved space) on the run's device."""
    if space is None or space == "auto":
        choice = resolve(run)
        if choice is None:
            raise ConfigError(f"metrics in a feature space need image data (or metric.extractor); data.name = "
                              f"{run.cfg.data.name!r} has samples of shape {run.splits.sample_shape}")
        space = choice.space
    if space not in LOADERS:
        raise ConfigError(f"unknown feature space {space!r} (known: {', '.join(FEATURE_SPACES)})")
    loaded = run.__dict__.setdefault("_feature_models", {})  # one load (and hash of the weights) per open run
    if space not in loaded:
        loaded[space] = LOADERS[space](run).to(run.device)
    return loaded[space]


def metric_features(run: "Run") -> dict:
    """What a feature metric's outputs record: the space, why it was chosen, the network's file and hash."""
    choice = resolve(run)
    if choice is None:
        return {}
    return {**describe(load_feature_model(run, choice.space)), "chosen": choice.reason}


def describe(model: FeatureModel) -> dict:
    """What outputs record about a feature model: its space, key, source and the file's hash or settings."""
    return {"space": model.space, "key": model.key, "source": model.source, **model.record}


def summary_line(record: dict) -> str:
    """One line on the network a metric used: space, why, and the file with its sha256 (or the cache)."""
    if not record:
        return "features: none"
    where = f"{record['file']} (sha256 {record['sha256'][:16]}...)" if "sha256" in record else record.get("source", "")
    chosen = f" [{record['chosen']}]" if "chosen" in record else ""
    channels = f"; {record['channels']}" if "channels" in record else ""
    return f"features: {record['space']}{chosen}, from {where}{channels}"


def training_features(run: "Run", space: str | None = None) -> np.ndarray:
    """Features of every training instance (rows in training-split order), e.g. for Isolation Forest."""
    if not _images(run) and not run.extractor:
        raise ConfigError(f"features need image data (N, C, H, W); data.name = {run.cfg.data.name!r} has samples "
                          f"of shape {run.splits.sample_shape}: use --features raw")
    return load_feature_model(run, space).evaluate(run.splits.train.to(run.device))[0].cpu().numpy()
