"""Feature space ``classifier``: the frozen image classifier trained on the run's labelled training split.

Trained classifier (the ICLR paper's MNIST CNN)::

    conv 8@5x5 (same padding), sigmoid, maxpool 2
    conv 8@5x5 (same padding), sigmoid, maxpool 2
    flatten, dense 128, sigmoid        -> the features of FID and KID
    dense n_classes                    -> the logits of IS (L2 1e-3 on this layer, as in the paper)

It works for any image side >= 4 (28 -> 14 -> 7; 8 -> 4 -> 2). Glorot-uniform weights and zero biases;
Adam with ``metric.classifier_lr``, ``classifier_batch_size`` and ``classifier_epochs`` on softmax
cross-entropy in float32; one generator seeded with ``metric.seed`` draws the initial weights and the
minibatch order (the global RNG is not used).

Why the TRAINING split: the metrics compare generated images with the valid or test split, so a classifier
fitted to those images would see its own training data as the reference (the paper trained on its
validation split; we keep both evaluation splits held out). The test split gives the accuracy that is
reported. The classifier is part of the metric's definition and is held fixed: it is not retrained when a
counterfactual removes training instances, so influence and counterfactual measure the same function.

Cache: ``RUN/classifier.safetensors`` (weights) and ``RUN/classifier.json`` (the settings that produced
them: hyper-parameters, seed, sample shape, number of classes and a fingerprint of the labelled train and
test data, plus the test accuracy). The cache is used only when every setting matches; otherwise the
classifier is retrained and the files replaced.

Everything here evaluates the model in float64 with parameters that do not require grad, so gradients
reach the generated images but never the classifier.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MetricConfig
from ..data.base import MAX_CLASSES, as_float
from ..errors import DataError
from .base import FeatureModel, freeze, load_cached, model_key, save_cached

if TYPE_CHECKING:
    from ..run import Run

CACHE_FORMAT = 1
CACHE_STEM = "classifier"
ARCHITECTURE = "conv8x5-sigmoid-pool2/conv8x5-sigmoid-pool2/dense128-sigmoid/dense"
LOGIT_L2 = 1e-3  # the paper's L2 penalty on the last layer's weights
FEATURE_DIM = 128
CHANNELS = 8
KERNEL = 5


class SmallCNN(nn.Module):
    """The paper's MNIST classifier; ``forward`` returns (128-d sigmoid features, logits)."""

    def __init__(self, sample_shape: tuple[int, int, int], n_classes: int) -> None:
        super().__init__()
        c, h, w = sample_shape
        if h < 4 or w < 4:
            raise DataError(f"the classifier needs images of at least 4x4 (two 2x pools), "
                            f"got sample shape {tuple(sample_shape)}")
        self.conv1 = nn.Conv2d(c, CHANNELS, KERNEL, padding=KERNEL // 2)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, KERNEL, padding=KERNEL // 2)
        self.hidden = nn.Linear(CHANNELS * (h // 4) * (w // 4), FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, n_classes)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Glorot-uniform weights and zero biases (the paper's TensorFlow defaults)."""
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.hidden, self.out):
                w = layer.weight
                bound = (6.0 / (w[0].numel() + w.shape[0] * w[0, 0].numel())) ** 0.5  # fan in + fan out
                w.copy_(torch.rand(w.shape, generator=generator, dtype=w.dtype) * (2 * bound) - bound)
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(torch.sigmoid(self.conv1(x)), 2)
        h = F.max_pool2d(torch.sigmoid(self.conv2(h)), 2)
        features = torch.sigmoid(self.hidden(h.flatten(1)))
        return features, self.out(features)


# ---------------------------------------------------------------------------- training
def data_fingerprint(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor | None,
                     y_test: torch.Tensor | None) -> str:
    """A hash of the labelled images the classifier is trained and tested on."""
    h = hashlib.sha256()
    for t in (x_train, y_train, x_test, y_test):
        if t is None:
            h.update(b"none")
            continue
        h.update(str(tuple(t.shape)).encode())
        t = t.detach().contiguous()
        h.update((t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)).numpy().tobytes())
    return h.hexdigest()[:16]


def count_classes(*labels: torch.Tensor | None) -> int:
    present = [y for y in labels if y is not None and y.numel()]
    lo = min(int(y.min()) for y in present)
    if lo < 0:
        raise DataError(f"class labels must be non-negative integers, found {lo}")
    hi = max(int(y.max()) for y in present)
    if hi >= MAX_CLASSES:  # one output per class: a label of 2**30 would ask for a terabyte-sized layer
        raise DataError(f"the metric classifier supports at most {MAX_CLASSES} classes (labels 0..{MAX_CLASSES - 1}); "
                        f"found label {hi}")
    return max(2, hi + 1)


def classifier_settings(cfg: MetricConfig, seed: int, sample_shape: tuple[int, ...], n_classes: int,
                        fingerprint: str) -> dict:
    """Everything that determines the trained weights: the cache is valid only if all match."""
    return {"format": CACHE_FORMAT, "architecture": ARCHITECTURE, "logit_l2": LOGIT_L2, "epochs": cfg.classifier_epochs,
            "lr": cfg.classifier_lr, "batch_size": cfg.classifier_batch_size, "seed": seed,
            "sample_shape": list(sample_shape), "n_classes": n_classes, "data": fingerprint}


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, epochs: int, lr: float,
                     batch_size: int, seed: int) -> SmallCNN:
    """Fit the CNN with Adam on softmax cross-entropy (float32); deterministic in ``seed``."""
    if x.ndim != 4:
        raise DataError(f"the classifier needs images of shape (N, C, H, W), got {tuple(x.shape)}")
    model = SmallCNN(tuple(x.shape[1:]), n_classes)
    order = torch.Generator().manual_seed(seed)
    model.reset_parameters(order)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    y = y.to(torch.int64)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=order)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            _, logits = model(as_float(x[idx], torch.float32))  # uint8 images decode per batch
            loss = F.cross_entropy(logits, y[idx]) + LOGIT_L2 * model.out.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """Fraction of ``x`` whose arg-max logit is the label."""
    dtype = next(model.parameters()).dtype
    hits = 0
    for i in range(0, x.shape[0], chunk):
        _, logits = model(as_float(x[i:i + chunk], dtype))
        hits += int((logits.argmax(1) == y[i:i + chunk]).sum())
    return hits / max(1, x.shape[0])


def _as_feature_model(model: SmallCNN, settings: dict, source: str, acc: float | None) -> FeatureModel:
    record = {"architecture": ARCHITECTURE, "settings": settings, "test_accuracy": acc}
    return FeatureModel(freeze(model.to(torch.float64)), torch.float64, model_key("cnn", settings, model), source,
                        acc, space="classifier", record=record)


def cached_classifier(directory: str | Path, x_train: torch.Tensor, y_train: torch.Tensor,
                      x_test: torch.Tensor | None, y_test: torch.Tensor | None, cfg: MetricConfig,
                      seed: int) -> FeatureModel:
    """The classifier cached in ``directory`` if its settings match, else a freshly trained one, cached
    (``features.base.load_cached`` / ``save_cached``)."""
    directory = Path(directory)
    sample_shape = tuple(x_train.shape[1:])
    n_classes = count_classes(y_train, y_test)
    settings = classifier_settings(cfg, seed, sample_shape, n_classes,
                                   data_fingerprint(x_train, y_train, x_test, y_test))
    cached = load_cached(directory, CACHE_STEM, settings, lambda: SmallCNN(sample_shape, n_classes))
    if cached is not None:
        return _as_feature_model(cached[0], settings, str(directory / f"{CACHE_STEM}.safetensors"),
                                 cached[1].get("test_accuracy"))
    started = time.perf_counter()
    model = train_classifier(x_train, y_train, n_classes, epochs=cfg.classifier_epochs,
                             lr=cfg.classifier_lr, batch_size=cfg.classifier_batch_size, seed=seed)
    seconds = time.perf_counter() - started
    acc = accuracy(model, x_test, y_test) if x_test is not None and y_test is not None else None
    save_cached(directory, CACHE_STEM, model, {
        "settings": settings, "test_accuracy": acc, "n_test": None if x_test is None else int(x_test.shape[0]),
        "n_train": int(x_train.shape[0]), "train_seconds": round(seconds, 3), "torch": torch.__version__})
    return _as_feature_model(model, settings, f"trained on {x_train.shape[0]} images", acc)


def load_or_train_classifier(run: "Run") -> FeatureModel:
    """The run's classifier: cached in the run directory, trained on its labelled training split."""
    cfg = run.cfg.resolved()
    splits = run.splits
    if splits.y_train is None:
        raise DataError(f"data.name = {cfg.data.name!r} has no class labels to train the classifier "
                        "for is/log_is/fid/kid; set metric.extractor to a TorchScript model")
    if splits.train.ndim != 4:
        raise DataError(f"the classifier for is/log_is/fid/kid needs images (N, C, H, W); "
                        f"data.name = {cfg.data.name!r} has samples of shape {splits.sample_shape}")
    return cached_classifier(run.path, splits.train, splits.y_train, splits.test, splits.y_test,
                             cfg.metric, int(cfg.metric.seed))


