"""Feature space ``inception``: the Inception-v3 network of the FID standard, from its published weights file.

FID and IS were defined on one network: the 2015-12-05 TensorFlow Inception graph. ``InceptionV3`` is that
network as pytorch-fid and torch-fidelity port it, so FID, KID and IS computed here are the published ones:

- it differs from torchvision's Inception-v3: 1008 classes; average pools inside the blocks ignore padded zeros
  (TensorFlow's pooling); the last block max-pools where the others average;
- input: float images (N, C, H, W) in [-1, 1], gancleanse's range, C = 1 or 3 (one channel is replicated to the
  three RGB channels, the usual convention for grayscale data such as MNIST). They are mapped to torch-fidelity's
  pixel scale v = (x + 1) * 127.5 WITHOUT rounding to integers (a rounded pixel has no gradient), resized to
  299 x 299 by TensorFlow 1.x's bilinear resize (``resize_tf1``), as torch-fidelity does, then normalised as
  torch-fidelity does, (v - 128) / 128. An image already stored as uint8 pixels k gives x = k / 127.5 - 1 and so
  exactly torch-fidelity's input, up to float round-off;
- output: (2048-d features of the final average pool, the FID/KID features; 1008 logits). The logits are
  torch-fidelity's ``logits_unbiased``, the fc layer WITHOUT its bias, which torch-fidelity's IS uses (as the
  original IS code, which drops the bias); the bias is loaded but unused.

Weights: the published state dict (``gancleanse.features.weights``): pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` are the
same file and use the same key names (torchvision's Inception-v3 names without AuxLogits), read with
``torch.load(weights_only=True)`` (no pickled code runs), or a ``.safetensors`` file with the same keys. Batch-norm
``num_batches_tracked`` counters, a training statistic the network never uses, may be present or not.
Gradients reach the images but never the weights (``freeze``); float32 and float64 both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..integrity import sha256_file
from .base import FeatureModel, freeze
from .weights import PUBLISHED_NAMES, PUBLISHED_SHA256, checkpoints_dir

if TYPE_CHECKING:
    from ..run import Run

INPUT_SIZE = 299
FEATURE_DIM = 2048
N_CLASSES = 1008
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon in this graph
UNUSED_KEY_SUFFIX = ".num_batches_tracked"
INPUT_RECORD = ("images in [-1, 1], one channel replicated to RGB, mapped to pixels v = (x + 1) * 127.5 without "
                "rounding, resized to 299x299 by TensorFlow 1.x bilinear resize (align_corners=False, no half-pixel "
                "offset) as torch-fidelity, normalised (v - 128) / 128")
LOGITS_RECORD = "logits_unbiased: the 1008-way fc without its bias (torch-fidelity's Inception Score)"


# ---------------------------------------------------------------------------- input
def _tf1_grid(size_in: int, size_out: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows (lo, hi) and weight of hi for each output row: TensorFlow 1.x samples output index i at
    i * scale with scale = size_in / size_out held in float32 (no half-pixel offset), clamped at the last row."""
    scale = torch.tensor(size_in / size_out, dtype=torch.float32)
    position = torch.arange(size_out, dtype=like.dtype, device=like.device) * scale
    lo = position.floor().long()
    hi = (lo + 1).clamp_max(size_in - 1)
    return lo, hi, position - lo.to(torch.float32)


def _lerp_along(x: torch.Tensor, dim: int, size_out: int) -> torch.Tensor:
    lo, hi, weight = _tf1_grid(x.shape[dim], size_out, x)
    shape = [1] * x.ndim
    shape[dim] = size_out
    low = x.index_select(dim, lo)
    return low + (x.index_select(dim, hi) - low) * weight.view(shape)


def resize_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size) as TensorFlow 1.x (``align_corners=False``): along the
    width first, then the height, each output top + (bottom - top) * weight. Linear in ``x``, so differentiable."""
    return _lerp_along(_lerp_along(x, 3, size), 2, size)


def to_network_input(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 1 or 3, H, W) -> the network's 299x299 RGB input, as torch-fidelity prepares pixels."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"the Inception network takes images (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    pixels = (x.expand(-1, 3, -1, -1) + 1.0) * 127.5
    return (resize_tf1(pixels) - 128.0) / 128.0


# ---------------------------------------------------------------------------- network
class FrozenBatchNorm(nn.Module):
    """Batch normalisation with fixed statistics; state keys weight, bias, running_mean, running_var."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, BN_EPS)


class ConvBN(nn.Module):
    """Convolution without bias, batch norm, ReLU: every convolution of the network. ``same`` pads to keep the size
    (TensorFlow's SAME at stride 1), else no padding (VALID)."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 same: bool = False) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (kh // 2, kw // 2) if same else (0, 0)
        self.conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "avg": lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),  # TensorFlow's padded average
    "max": lambda x: F.max_pool2d(x, 3, stride=1, padding=1),
    "reduce": lambda x: F.max_pool2d(x, 3, stride=2),
}
Layer = tuple[str, ConvBN]


@dataclass(frozen=True)
class Branch:
    """One branch of a block: an optional pool, convolutions in order, then an optional fork (convolutions side by
    side on the same input, concatenated: the 1x3 / 3x1 pairs of the last blocks)."""

    chain: tuple[Layer, ...] = ()
    pool: str | None = None
    fork: tuple[Layer, ...] = ()


def branch(*chain: Layer, pool: str | None = None, fork: tuple[Layer, ...] = ()) -> Branch:
    return Branch(chain, pool, fork)


class Mixed(nn.Module):
    """An Inception block: parallel branches concatenated along channels. Layers are registered under their
    published names (``branch5x5_1``...), so the state dict keys are those of the weights file."""

    def __init__(self, *branches: Branch) -> None:
        super().__init__()
        self.plans: list[tuple[str | None, tuple[str, ...], tuple[str, ...]]] = []
        for b in branches:
            for name, layer in (*b.chain, *b.fork):
                self.add_module(name, layer)
            self.plans.append((b.pool, tuple(n for n, _ in b.chain), tuple(n for n, _ in b.fork)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for pool, chain, fork in self.plans:
            h = POOLS[pool](x) if pool else x
            for name in chain:
                h = self._modules[name](h)
            if fork:
                h = torch.cat([self._modules[name](h) for name in fork], 1)
            outputs.append(h)
        return torch.cat(outputs, 1)


def block_a(c_in: int, pool_channels: int) -> Mixed:
    return Mixed(branch(("branch1x1", ConvBN(c_in, 64, 1))),
                 branch(("branch5x5_1", ConvBN(c_in, 48, 1)), ("branch5x5_2", ConvBN(48, 64, 5, same=True))),
                 branch(("branch3x3dbl_1", ConvBN(c_in, 64, 1)), ("branch3x3dbl_2", ConvBN(64, 96, 3, same=True)),
                        ("branch3x3dbl_3", ConvBN(96, 96, 3, same=True))),
                 branch(("branch_pool", ConvBN(c_in, pool_channels, 1)), pool="avg"))


def block_b(c_in: int) -> Mixed:
    return Mixed(branch(("branch3x3", ConvBN(c_in, 384, 3, stride=2))),
                 branch(("branch3x3dbl_1", ConvBN(c_in, 64, 1)), ("branch3x3dbl_2", ConvBN(64, 96, 3, same=True)),
                        ("branch3x3dbl_3", ConvBN(96, 96, 3, stride=2))),
                 branch(pool="reduce"))


def block_c(c7: int, c_in: int = 768) -> Mixed:
    row, col = (1, 7), (7, 1)
    return Mixed(branch(("branch1x1", ConvBN(c_in, 192, 1))),
                 branch(("branch7x7_1", ConvBN(c_in, c7, 1)), ("branch7x7_2", ConvBN(c7, c7, row, same=True)),
                        ("branch7x7_3", ConvBN(c7, 192, col, same=True))),
                 branch(("branch7x7dbl_1", ConvBN(c_in, c7, 1)), ("branch7x7dbl_2", ConvBN(c7, c7, col, same=True)),
                        ("branch7x7dbl_3", ConvBN(c7, c7, row, same=True)),
                        ("branch7x7dbl_4", ConvBN(c7, c7, col, same=True)),
                        ("branch7x7dbl_5", ConvBN(c7, 192, row, same=True))),
                 branch(("branch_pool", ConvBN(c_in, 192, 1)), pool="avg"))


def block_d(c_in: int = 768) -> Mixed:
    return Mixed(branch(("branch3x3_1", ConvBN(c_in, 192, 1)), ("branch3x3_2", ConvBN(192, 320, 3, stride=2))),
                 branch(("branch7x7x3_1", ConvBN(c_in, 192, 1)), ("branch7x7x3_2", ConvBN(192, 192, (1, 7), same=True)),
                        ("branch7x7x3_3", ConvBN(192, 192, (7, 1), same=True)),
                        ("branch7x7x3_4", ConvBN(192, 192, 3, stride=2))),
                 branch(pool="reduce"))


def block_e(c_in: int, pool: str) -> Mixed:
    def pair(prefix: str) -> tuple[Layer, Layer]:
        """The 1x3 and 3x1 convolutions side by side."""
        return ((f"{prefix}a", ConvBN(384, 384, (1, 3), same=True)),
                (f"{prefix}b", ConvBN(384, 384, (3, 1), same=True)))

    return Mixed(branch(("branch1x1", ConvBN(c_in, 320, 1))),
                 branch(("branch3x3_1", ConvBN(c_in, 384, 1)), fork=pair("branch3x3_2")),
                 branch(("branch3x3dbl_1", ConvBN(c_in, 448, 1)), ("branch3x3dbl_2", ConvBN(448, 384, 3, same=True)),
                        fork=pair("branch3x3dbl_3")),
                 branch(("branch_pool", ConvBN(c_in, 192, 1)), pool=pool))


def _stages() -> list[tuple[str, nn.Module]]:
    """The layers in order, under the published names (the pools have no weights)."""
    return [("Conv2d_1a_3x3", ConvBN(3, 32, 3, stride=2)), ("Conv2d_2a_3x3", ConvBN(32, 32, 3)),
            ("Conv2d_2b_3x3", ConvBN(32, 64, 3, same=True)), ("MaxPool_1", nn.MaxPool2d(3, stride=2)),
            ("Conv2d_3b_1x1", ConvBN(64, 80, 1)), ("Conv2d_4a_3x3", ConvBN(80, 192, 3)),
            ("MaxPool_2", nn.MaxPool2d(3, stride=2)),
            ("Mixed_5b", block_a(192, 32)), ("Mixed_5c", block_a(256, 64)), ("Mixed_5d", block_a(288, 64)),
            ("Mixed_6a", block_b(288)), ("Mixed_6b", block_c(128)), ("Mixed_6c", block_c(160)),
            ("Mixed_6d", block_c(160)), ("Mixed_6e", block_c(192)), ("Mixed_7a", block_d()),
            ("Mixed_7b", block_e(1280, "avg")), ("Mixed_7c", block_e(2048, "max"))]


class InceptionV3(nn.Module):
    """The FID Inception-v3: images in [-1, 1] -> (2048-d pool features, 1008 logits without the fc bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage_names: tuple[str, ...] = ()
        for name, layer in _stages():
            self.add_module(name, layer)
            self.stage_names += (name,)
        self.fc = nn.Linear(FEATURE_DIM, N_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = to_network_input(x)
        for name in self.stage_names:
            h = self._modules[name](h)
        features = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return features, features.mm(self.fc.weight.T)


# ---------------------------------------------------------------------------- loading
def _read_tensors(path: Path) -> object:
    """The file's contents without running any pickled code: safetensors, or torch.load(weights_only=True)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch and safetensors raise many types for a damaged file
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"Inception weights {path}: not a readable weights file, truncated or damaged "
                        f"({type(e).__name__}: {reason})") from None


def _first(names: set[str], count: int = 3) -> str:
    listed = sorted(names)
    return ", ".join(listed[:count]) + (f" and {len(listed) - count} more" if len(listed) > count else "")


def checked_state(state: object, path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` if it is the published layout (``expected``: names and shapes), without the unused batch-norm
    counters; otherwise a one-line DataError naming the first wrong keys, a wrong shape or dtype, or non-finite
    values."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise DataError(f"Inception weights {path}: not a state dict (a mapping of names to tensors), "
                        f"found {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.endswith(UNUSED_KEY_SUFFIX)}
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        parts = ([f"missing keys {_first(missing)}"] if missing else []) + (
            [f"unexpected keys {_first(unexpected)}"] if unexpected else [])
        raise DataError(f"Inception weights {path}: not the FID Inception-v3 state dict: {'; '.join(parts)}")
    for name, reference in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            found = f"a tensor of dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"Inception weights {path}: {name} must be a floating-point tensor, found {found}")
        if t.shape != reference.shape:
            raise DataError(f"Inception weights {path}: {name} has shape {tuple(t.shape)}, expected "
                            f"{tuple(reference.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"Inception weights {path}: {name} has non-finite values")
    return state


def load_inception(path: str | Path, dtype: torch.dtype = torch.float32) -> FeatureModel:
    """The FID Inception-v3 with the weights in ``path`` (the published state dict, .pth or .safetensors), frozen,
    in ``dtype``; its key is the file's sha256, which outputs record with the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Inception weights {path}: no such file")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise DataError(f"Inception weights {path}: cannot be read ({e.strerror or e})") from None
    module = InceptionV3()
    module.load_state_dict(checked_state(_read_tensors(path), path, module.state_dict()))
    record = {"file": str(path), "sha256": digest, "published_file": digest == PUBLISHED_SHA256,
              "input": INPUT_RECORD, "logits": LOGITS_RECORD}
    return FeatureModel(freeze(module.to(dtype)), dtype, f"inception:{digest[:16]}", str(path), space="inception",
                        has_logits=True, record=record)


# ---------------------------------------------------------------------------- finding the file
def missing_weights_message() -> str:
    """Where the weights file goes and how to get it (one line)."""
    return (f"no Inception-v3 weights file: put {PUBLISHED_NAMES[0]} (or {PUBLISHED_NAMES[1]}) in "
            f"{checkpoints_dir()}, or set [metric] weights = PATH; `gancleanse weights inception` downloads it "
            "(hash-checked) on a machine with network access")


def find_weights(configured: str | None) -> Path | None:
    """The Inception weights file: ``configured`` (``[metric] weights``, ``~`` expanded) when given, else the first
    published name found in torch.hub's checkpoint cache, else None."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise ConfigError(f"metric.weights: the Inception weights file {path} is missing (the default cache is "
                              f"{checkpoints_dir()}; `gancleanse weights inception` fetches it)")
        return path
    directory = checkpoints_dir()
    return next((directory / name for name in PUBLISHED_NAMES if (directory / name).is_file()), None)


def load_for_run(run: "Run") -> FeatureModel:
    """The Inception feature model of a run's metrics: its weights file, in float64 for a float64 run (float32
    otherwise, the precision the network was published in)."""
    path = find_weights(run.cfg.metric.weights)
    if path is None:
        raise ConfigError(missing_weights_message())
    shape = tuple(run.splits.sample_shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise DataError(f"the Inception feature space needs images (N, C, H, W) with C = 1 or 3; data.name = "
                        f"{run.cfg.data.name!r} has samples of shape {shape}")
    model = load_inception(path, torch.float64 if run.dtype == torch.float64 else torch.float32)
    if shape[0] == 1:  # said in the record and on the command line, as torch-fidelity does it silently
        model.record["channels"] = "grayscale images: the one channel replicated to RGB"
    return model
