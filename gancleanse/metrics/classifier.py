"""The frozen image classifier behind IS, FID and KID: trained here and cached, or user-supplied.

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

User extractor (``metric.extractor``): a TorchScript file whose ``forward`` takes a float tensor
(N, C, H, W) of images in [-1, 1] (the data's own shape) and returns either

- ``logits`` of shape (N, K): used as logits for IS and as the features of FID/KID, or
- a tuple ``(features, logits)`` of shapes (N, D) and (N, K).

Inputs are cast to the dtype of the module's first floating parameter (float32 if it has none) and outputs
to float64. A relative path is taken from the current directory.

Everything here evaluates the model in float64 with parameters that do not require grad, so gradients
reach the generated images but never the classifier.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from ..config import MetricConfig
from ..data.base import MAX_CLASSES, as_float
from ..errors import ConfigError, DataError
from ..files import atomic_write, write_json_atomic

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


@dataclass(frozen=True)
class FeatureModel:
    """A frozen classifier: images -> (features, logits), both float64; ``key`` identifies the model
    (hash of settings and weights, or of the file) for caches of real statistics."""

    module: nn.Module
    dtype: torch.dtype
    key: str
    source: str
    accuracy: float | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.module(as_float(x, self.dtype))
        features, logits = out if isinstance(out, (tuple, list)) else (out, out)
        return features.to(torch.float64), logits.to(torch.float64)

    def to(self, device: torch.device) -> "FeatureModel":
        """The same frozen model on ``device`` (it is trained and cached on the CPU)."""
        return dataclasses.replace(self, module=self.module.to(device))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[1]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits of many images without a graph (real data), in chunks."""
        parts = [self(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def freeze(module: nn.Module) -> nn.Module:
    """Evaluation mode, parameters excluded from autograd (gradients stop at the images)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


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
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):  # the weights too: equal settings, other threads
        h.update(name.encode() + t.detach().contiguous().numpy().tobytes())
    return FeatureModel(freeze(model.to(torch.float64)), torch.float64, "cnn:" + h.hexdigest()[:16], source, acc)


def cached_classifier(directory: str | Path, x_train: torch.Tensor, y_train: torch.Tensor,
                      x_test: torch.Tensor | None, y_test: torch.Tensor | None, cfg: MetricConfig,
                      seed: int) -> FeatureModel:
    """The classifier cached in ``directory`` if its settings match, else a freshly trained one, saved with
    the JSON written last and atomically (a half-written cache never matches; an unwritable directory only
    costs the reuse)."""
    directory = Path(directory)
    weights_path = directory / f"{CACHE_STEM}.safetensors"
    meta_path = directory / f"{CACHE_STEM}.json"
    sample_shape = tuple(x_train.shape[1:])
    n_classes = count_classes(y_train, y_test)
    settings = classifier_settings(cfg, seed, sample_shape, n_classes,
                                   data_fingerprint(x_train, y_train, x_test, y_test))
    try:  # a missing, stale, damaged or replaced cache is retrained below (a cache is never trusted blindly)
        meta = json.loads(meta_path.read_text())
        if meta["settings"] != settings:
            raise ValueError("settings changed since the classifier was cached")
        data = weights_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
            raise ValueError("weights changed since they were cached")
        model = SmallCNN(sample_shape, n_classes)
        model.load_state_dict(load_safetensors(data))
    except Exception:
        pass
    else:
        return _as_feature_model(model, settings, str(weights_path), meta.get("test_accuracy"))
    started = time.perf_counter()
    model = train_classifier(x_train, y_train, n_classes, epochs=cfg.classifier_epochs,
                             lr=cfg.classifier_lr, batch_size=cfg.classifier_batch_size, seed=seed)
    seconds = time.perf_counter() - started
    acc = accuracy(model, x_test, y_test) if x_test is not None and y_test is not None else None
    meta = {"settings": settings, "test_accuracy": acc, "n_test": None if x_test is None else int(x_test.shape[0]),
            "n_train": int(x_train.shape[0]), "train_seconds": round(seconds, 3), "torch": torch.__version__}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if meta_path.exists():
            meta_path.unlink()  # invalidate before the weights change
        weights = tensors_to_bytes({k: v.detach().contiguous() for k, v in model.state_dict().items()})
        meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        with atomic_write(weights_path, binary=True) as f:
            f.write(weights)
        write_json_atomic(meta_path, meta)
    except OSError as e:
        warnings.warn(f"could not cache the classifier in {directory}: {e}", stacklevel=2)
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


# --------------------------------------------------------------------------- extractor
def load_extractor(path: str | Path, sample_shape: tuple[int, ...]) -> FeatureModel:
    """A user TorchScript model, checked on a probe batch of the data's sample shape."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"metric.extractor: file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = freeze(torch.jit.load(str(path), map_location="cpu"))
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        raise DataError(f"metric.extractor {path}: not a loadable TorchScript file ({_failure(e)})") from None
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    probe = torch.zeros((2, *sample_shape), dtype=dtype)
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
        raise DataError(f"metric.extractor {path}: failed on a batch of shape {tuple(probe.shape)} "
                        f"({_failure(e)})") from None
    _check_output(out, path, tuple(probe.shape))
    return FeatureModel(module, dtype, f"extractor:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}", str(path))


def _failure(e: Exception) -> str:
    """The exception's type and the first line of its message (at most 200 characters)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _check_output(out: object, path: Path, shape: tuple[int, ...]) -> None:
    def ok(t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 2 and t.shape[0] == shape[0]

    def describe(t: object) -> str:
        return f"tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__

    pair = isinstance(out, (tuple, list))
    parts: list[Any] = list(out) if isinstance(out, (tuple, list)) else [out]  # (features, logits), or logits
    if len(parts) == (2 if pair else 1) and all(ok(t) for t in parts) and parts[-1].shape[1] >= 2:
        return
    got = "(" + ", ".join(describe(t) for t in parts) + ")" if pair else describe(out)
    raise DataError(f"metric.extractor {path}: for input of shape {shape} it must return logits "
                    f"({shape[0]}, K>=2) or (features ({shape[0]}, D), logits ({shape[0]}, K>=2)); got {got}")


def extractor_file(run: "Run") -> str | None:
    """The TorchScript extractor to load for ``run``: only one the user named explicitly. Loading TorchScript
    runs code, so the path stored in a run directory's config is never loaded on its own authority; it must be
    given again (``--extractor`` / ``Run.open``)."""
    if run.extractor is not None:
        return run.extractor
    if run.cfg.metric.extractor:
        raise ConfigError(f"the metrics of run {run.path} use the TorchScript extractor "
                          f"{run.cfg.metric.extractor}, which runs code when loaded: name it explicitly "
                          f"(--extractor {run.cfg.metric.extractor}, or Run.open(path, extractor=...))")
    return None


def load_feature_model(run: "Run") -> FeatureModel:
    """The explicitly named extractor, else the run's own trained classifier."""
    extractor = extractor_file(run)
    model = load_extractor(extractor, run.splits.sample_shape) if extractor else load_or_train_classifier(run)
    return model.to(run.device)


def training_features(run: "Run") -> np.ndarray:
    """Features of every training instance (rows in training-split order), e.g. for Isolation Forest, from the
    model the metrics use: ``metric.extractor`` when set, else the run's classifier."""
    if run.splits.train.ndim != 4 and not extractor_file(run):
        raise ConfigError(f"classifier features need image data (N, C, H, W); data.name = "
                          f"{run.cfg.data.name!r} has samples of shape {run.splits.sample_shape}: use --features raw")
    return load_feature_model(run).evaluate(run.splits.train.to(run.device))[0].cpu().numpy()
