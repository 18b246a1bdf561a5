"""Feature space ``self_supervised``: an image encoder trained on the run's training split without labels.

Most image folders have no labels, so the classifier space cannot be trained and the Inception weights may be
absent; this encoder makes every image run scorable offline. Its Frechet distance is "FD (self-supervised
encoder)": comparable between states of one run, never with published FID values.

Encoder (any channel count, any side >= 8)::

    conv WIDTH@3x3, GroupNorm, SiLU, avgpool 2
    conv 2*WIDTH@3x3, GroupNorm, SiLU, avgpool 2
    conv 2*WIDTH@3x3, GroupNorm, SiLU, adaptive average pool to GRIDxGRID
    flatten, dense FEATURE_DIM                            -> the features of FID and KID

The dense layer over the grid sees where things are, so the features describe an image's layout (which
digit, which object) rather than a bag of local textures: with a global average instead, the FD ranked a
DCGAN's states on the digits by texture (Spearman 0.35-0.57 against the classifier's FID, 0.90-0.96 with
the grid; bench/self_supervised_quality.py).
Smooth activations and average pooling keep the gradient that reaches generated images smooth; GroupNorm
normalises each image on its own, so an image's features never depend on the other images of a chunk. A
projection head (dense, SiLU, dense) is used only while training and is not kept.

Training: SimCLR's contrastive NT-Xent loss (temperature ``metric.encoder_temperature``) between two random
views of each image of a minibatch, Adam with ``encoder_lr``, ``encoder_batch_size`` and ``encoder_epochs``
in float32 on the CPU (also when the run computes on CUDA: the weights are then bitwise reproducible).
Views (``augment``, images in [-1, 1]) change the rendering strongly and the geometry slightly: a random
blur or sharpening, a saturating contrast curve, brightness and contrast jitter and Gaussian noise, so that
the features ignore stroke texture and sharpness; a zoom (0.8-1.1), translation (up to 1/8 of the side)
and rotation (up to 15 degrees). There are no flips and no large rotations: they change the identity of
characters and digits (a mirrored 2, a 6 turned into a 9), and the encoder must tell those apart. One
``torch.Generator`` seeded with ``metric.seed`` draws the initial weights, the minibatch order and every
view; the global RNG is not used.

Why the TRAINING split: the metrics compare generated images with the valid or test split, which stay held
out. Like the classifier, the encoder is part of the metric's definition: it is not retrained when a
counterfactual removes training instances.

Cache: ``RUN/self_supervised.safetensors`` and ``RUN/self_supervised.json`` (``base.load_cached`` /
``save_cached``): the settings that produced the weights (architecture, views, hyper-parameters, seed,
sample shape, a fingerprint of the training images, format), the loss per epoch and the training time.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MetricConfig
from ..data.base import as_float
from ..errors import DataError
from .base import FeatureModel, freeze, load_cached, model_key, save_cached

if TYPE_CHECKING:
    from ..run import Run

CACHE_FORMAT = 1
CACHE_STEM = "self_supervised"
MIN_SIDE = 8  # two 2x poolings leave at least 2x2 positions to average
WIDTH = 32
GRID = 7  # the last feature map is averaged onto GRID x GRID cells before the dense layer (28 -> 7: all of it)
FEATURE_DIM = 128
PROJECTION_DIM = 64
GROUPS = 8
ARCHITECTURE = (f"conv{WIDTH}x3-gn-silu-avgpool2/conv{2 * WIDTH}x3-gn-silu-avgpool2/conv{2 * WIDTH}x3-gn-silu-"
                f"adaptiveavg{GRID}x{GRID}/dense{FEATURE_DIM}; head dense{FEATURE_DIM}-silu-dense{PROJECTION_DIM}")
BLUR = 1.0  # largest weight of the 3x3 box blur; negative weights (down to -BLUR) sharpen
SATURATION = (1.0, 8.0)  # gain g of the contrast curve tanh(g x) / tanh(g), log-uniform
ZOOM = (0.8, 1.1)  # magnification of a view
SHIFT = 0.125  # largest translation, as a fraction of the side
ROTATION_DEGREES = 15.0
BRIGHTNESS = 0.2  # largest shift of the mean, on the [-1, 1] scale
CONTRAST = (0.7, 1.3)  # factor on the deviations from the image mean
NOISE = 0.2  # standard deviation of the added Gaussian noise
VIEWS = (f"blur{BLUR}/saturation{SATURATION[0]}-{SATURATION[1]}/zoom{ZOOM[0]}-{ZOOM[1]}/shift{SHIFT}/"
         f"rotate{ROTATION_DEGREES}/brightness{BRIGHTNESS}/contrast{CONTRAST[0]}-{CONTRAST[1]}/noise{NOISE}/"
         "border-padding/no-flips")


def check_images(x: torch.Tensor) -> None:
    """One-line DataErrors for data the encoder cannot see: not (N, C, H, W), or a side under MIN_SIDE."""
    if x.ndim != 4:
        raise DataError(f"the self-supervised encoder needs images of shape (N, C, H, W), got samples of shape "
                        f"{tuple(x.shape[1:])}")
    if min(x.shape[2:]) < MIN_SIDE:
        raise DataError(f"the self-supervised encoder needs images of at least {MIN_SIDE}x{MIN_SIDE}, got sample "
                        f"shape {tuple(x.shape[1:])}")


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # built on the meta device: the default initialisation would draw from the global RNG
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, device="meta"),
                         nn.GroupNorm(GROUPS, out_channels, device="meta"), nn.SiLU())


def _initialise(module: nn.Module, generator: torch.Generator) -> None:
    """He-uniform weights of conv and dense layers, zero biases, unit norm scales: all from ``generator``."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                w = layer.weight
                bound = math.sqrt(6.0 / w[0].numel())
                w.copy_(torch.rand(w.shape, generator=generator, dtype=w.dtype) * (2 * bound) - bound)
                layer.bias.zero_()
            elif isinstance(layer, nn.GroupNorm):
                layer.weight.fill_(1.0)
                layer.bias.zero_()


class Encoder(nn.Module):
    """The feature network; ``forward`` returns the FEATURE_DIM features only (there are no classes)."""

    def __init__(self, sample_shape: tuple[int, ...], generator: torch.Generator) -> None:
        super().__init__()
        check_images(torch.empty((0, *sample_shape), device="meta"))
        self.blocks = nn.Sequential(_conv_block(sample_shape[0], WIDTH), nn.AvgPool2d(2),
                                    _conv_block(WIDTH, 2 * WIDTH), nn.AvgPool2d(2),
                                    _conv_block(2 * WIDTH, 2 * WIDTH), nn.AdaptiveAvgPool2d(GRID))
        self.dense = nn.Linear(2 * WIDTH * GRID * GRID, FEATURE_DIM, device="meta")
        _initialise(self, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.blocks(x).flatten(1))


def projection_head(generator: torch.Generator) -> nn.Module:
    """The training-only head the contrastive loss sees (SimCLR): features are taken before it."""
    head = nn.Sequential(nn.Linear(FEATURE_DIM, FEATURE_DIM, device="meta"), nn.SiLU(),
                         nn.Linear(FEATURE_DIM, PROJECTION_DIM, device="meta"))
    _initialise(head, generator)
    return head


# ---------------------------------------------------------------------------- views and loss
def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float32)


def _column(n: int, low: float, high: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return _uniform(n, low, high, generator).view(n, 1, 1, 1).to(dtype)


def _render(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur or sharpen, then a saturating contrast curve: the same shape drawn with other strokes."""
    n, dtype = x.shape[0], x.dtype
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + _column(n, -BLUR, BLUR, generator, dtype) * (blurred - x)
    low, high = math.log(SATURATION[0]), math.log(SATURATION[1])
    gain = torch.exp(_column(n, low, high, generator, dtype))
    return torch.tanh(gain * x) / torch.tanh(gain)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of each float image in [-1, 1] (see the module doc); every draw comes from ``generator``."""
    x = _render(x, generator)
    n = x.shape[0]
    scale = 1.0 / _uniform(n, *ZOOM, generator)  # the sampling grid shrinks when the view zooms in
    angle = _uniform(n, -ROTATION_DEGREES, ROTATION_DEGREES, generator) * (math.pi / 180.0)
    shift = _uniform(2 * n, -2 * SHIFT, 2 * SHIFT, generator).view(n, 2)  # grid coordinates span 2 per side
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    view = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _column(n, *CONTRAST, generator, x.dtype)
    brightness = _column(n, -BRIGHTNESS, BRIGHTNESS, generator, x.dtype)
    view = mean + brightness + contrast * (view - mean)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype)
    return view + NOISE * noise


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross-entropy: each view must pick its partner among the other 2N - 1."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    similarity = (z @ z.T) / temperature
    similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(similarity, partner)


# ---------------------------------------------------------------------------- training
def image_fingerprint(x: torch.Tensor) -> str:
    """A hash of the training images as stored (dtype, shape, bytes), read a block of rows at a time."""
    h = hashlib.sha256(f"{x.dtype}{tuple(x.shape)}".encode())
    x = x.detach().cpu()
    rows = max(1, (1 << 24) // max(1, x[0].numel() * x.element_size())) if x.shape[0] else 1
    for start in range(0, x.shape[0], rows):
        h.update(x[start:start + rows].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_settings(cfg: MetricConfig, seed: int, sample_shape: tuple[int, ...], fingerprint: str) -> dict:
    """Everything that determines the trained weights: the cache is valid only if all match."""
    return {"format": CACHE_FORMAT, "architecture": ARCHITECTURE, "views": VIEWS, "epochs": cfg.encoder_epochs,
            "lr": cfg.encoder_lr, "batch_size": cfg.encoder_batch_size, "temperature": cfg.encoder_temperature,
            "seed": seed, "sample_shape": list(sample_shape), "data": fingerprint}


def train_encoder(x: torch.Tensor, *, epochs: int, lr: float, batch_size: int, temperature: float,
                  seed: int) -> tuple[Encoder, list[float]]:
    """Fit the encoder contrastively on the CPU in float32; returns it and the mean loss of each epoch.
    Deterministic in ``seed`` (bitwise at a fixed thread count)."""
    check_images(x)
    if x.shape[0] < 2:
        raise DataError(f"the self-supervised encoder needs at least 2 training images, got {x.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    encoder = Encoder(tuple(x.shape[1:]), generator)
    head = projection_head(generator)
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=lr)
    n = x.shape[0]
    batch_size = min(batch_size, n)
    curve = []
    encoder.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n - batch_size + 1, batch_size):  # full batches: every loss sees as many negatives
            images = as_float(x[order[start:start + batch_size]].cpu(), torch.float32)
            views = torch.cat([augment(images, generator), augment(images, generator)])
            projected = head(encoder(views))
            loss = nt_xent(projected[:batch_size], projected[batch_size:], temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        curve.append(total / (n // batch_size))
    return encoder, curve


def _as_feature_model(encoder: Encoder, settings: dict, source: str, curve: list[float],
                      weights_sha256: str) -> FeatureModel:
    record = {"architecture": ARCHITECTURE, "settings": settings, "loss_curve": curve,
              "weights_sha256": weights_sha256}
    return FeatureModel(freeze(encoder.to(torch.float64)), torch.float64, model_key("ssl", settings, encoder),
                        source, None, space="self_supervised", has_logits=False, record=record)


def cached_encoder(directory: str | Path, x_train: torch.Tensor, cfg: MetricConfig, seed: int) -> FeatureModel:
    """The encoder cached in ``directory`` if its settings and weights match, else a freshly trained one,
    cached (``features.base.load_cached`` / ``save_cached``)."""
    check_images(x_train)
    directory = Path(directory)
    sample_shape = tuple(x_train.shape[1:])
    settings = encoder_settings(cfg, seed, sample_shape, image_fingerprint(x_train))
    cached = load_cached(directory, CACHE_STEM, settings,
                         lambda: Encoder(sample_shape, torch.Generator().manual_seed(seed)))
    if cached is not None:
        module, meta = cached
        return _as_feature_model(module, settings, str(directory / f"{CACHE_STEM}.safetensors"),
                                 list(meta.get("loss_curve", [])), meta["weights_sha256"])
    started = time.perf_counter()
    encoder, curve = train_encoder(x_train, epochs=cfg.encoder_epochs, lr=cfg.encoder_lr,
                                   batch_size=cfg.encoder_batch_size, temperature=cfg.encoder_temperature, seed=seed)
    seconds = time.perf_counter() - started
    meta = save_cached(directory, CACHE_STEM, encoder, {
        "settings": settings, "loss_curve": curve, "train_seconds": round(seconds, 3),
        "n_train": int(x_train.shape[0]), "torch": torch.__version__})
    return _as_feature_model(encoder, settings, f"trained on {x_train.shape[0]} images", curve,
                             meta["weights_sha256"])


def load_or_train_encoder(run: "Run") -> FeatureModel:
    """The run's encoder: cached in the run directory, trained on its training split without labels."""
    cfg = run.cfg.resolved()
    splits = run.splits
    if splits.train.ndim != 4:
        raise DataError(f"the self-supervised encoder needs images (N, C, H, W); data.name = {cfg.data.name!r} "
                        f"has samples of shape {splits.sample_shape}")
    return cached_encoder(run.path, splits.train, cfg.metric, int(cfg.metric.seed))
