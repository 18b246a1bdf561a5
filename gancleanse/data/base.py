"""The split container and the helpers every loader shares. It imports no loader, so
``gancleanse.data`` can register the loaders on top of it without an import cycle."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError

SPLIT_NAMES = ("train", "valid", "test")
MAX_LABEL = 2**31  # labels read from files lie in 0 .. MAX_LABEL - 1
MAX_CLASSES = 2**16  # a conditional GAN embeds each class: at most this many (labels 0 .. MAX_CLASSES - 1)


def as_float(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Stored samples -> model values: uint8 pixels 0..255 map linearly onto [-1, 1], floats are cast.
    Image datasets stay uint8 in memory (an eighth of float64) and are converted a minibatch at a time."""
    return x.to(dtype) / 127.5 - 1.0 if x.dtype == torch.uint8 else x.to(dtype)


def permutation(n: int, seed: int) -> torch.Tensor:
    """The split permutation: a function of ``data.seed`` alone, never the global RNG."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def row_keys(parts: tuple[torch.Tensor, ...]) -> dict[str, list[str]]:
    """Instance keys ``#i``: the row of each split's instances in the source array."""
    return {name: [f"#{int(i)}" for i in idx] for name, idx in zip(SPLIT_NAMES, parts)}


@dataclass(frozen=True)
class Splits:
    """Train / validation / test samples on the CPU; labels and instance keys where known.

    Index ``j`` of ``train`` is instance ``j`` in every score file and removal list; its stable name is
    ``keys["train"][j]`` (a file's relative path, or ``#i`` for row ``i`` of an array). Samples are float64, or
    uint8 pixels for image files (see ``as_float``). ``source``: the file(s) the data came from and their hashes,
    for export (``data.source_check``).
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    y_train: torch.Tensor | None = None
    y_valid: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    keys: dict[str, list[str]] | None = field(default=None, compare=False)
    source: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one instance (what the models are built for)."""
        return tuple(self.train.shape[1:])

    def split(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The whole split ``name`` as model values (floats) of ``dtype``."""
        return as_float(self.split_stored(name), dtype)

    def labels(self, name: str) -> torch.Tensor | None:
        """The split's class labels (int64), or None for unlabelled data."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, f"y_{name}")

    @property
    def n_classes(self) -> int | None:
        """1 + the largest label of any split; None without training labels."""
        if self.y_train is None:
            return None
        return 1 + max(int(y.max()) for y in (self.y_train, self.y_valid, self.y_test) if y is not None and y.numel())

    def label_frequencies(self) -> torch.Tensor:
        """Each class's share of the training split (float64): a conditional GAN draws its labels from it."""
        counts = torch.bincount(self.y_train, minlength=self.n_classes).to(torch.float64)
        return counts / counts.sum()

    def check_conditional(self) -> None:
        """A conditional GAN needs integer labels 0 .. MAX_CLASSES - 1 on every split, checked before the label
        embeddings and frequencies are allocated."""
        missing = [name for name in SPLIT_NAMES if self.labels(name) is None]
        if missing:
            raise DataError(f"model.conditional = true needs labels on every split; the {', '.join(missing)} "
                            f"split{'s have' if len(missing) > 1 else ' has'} none (image files: labels from "
                            "class subfolders with data.labels = 'folders' or a dataset.json; arrays: y)")
        for name in SPLIT_NAMES:
            y = self.labels(name)
            if y.numel() and int(y.min()) < 0:
                raise DataError(f"model.conditional = true needs class labels 0, 1, ...; the {name} split has "
                                f"label {int(y.min())}")
            if y.numel() and int(y.max()) >= MAX_CLASSES:
                raise DataError(f"model.conditional = true supports at most {MAX_CLASSES} classes (labels 0.."
                                f"{MAX_CLASSES - 1}); the {name} split has label {int(y.max())}")

    def split_stored(self, name: str) -> torch.Tensor:
        """The split ``name`` as stored (uint8 pixels for image files)."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}")
        return getattr(self, name)

    def key_list(self, name: str) -> list[str]:
        """Stable names of the split's instances (``#j`` by position when the data has none)."""
        return list(self.keys[name]) if self.keys is not None else [f"#{j}" for j in range(len(getattr(self, name)))]

    def fingerprint(self) -> str:
        """A hash of the data, saved in a run so that later data changes are caught: for image files
        every file's bytes and the split of their keys, otherwise the split tensors' values."""
        digest = hashlib.sha256()
        if self.source is not None and "digest" in self.source:
            digest.update(self.source["digest"].encode())
            for name in SPLIT_NAMES:
                digest.update(("\n".join([name, *self.key_list(name)]) + "\n").encode())
        else:
            for split in (self.train, self.valid, self.test):
                digest.update(split.detach().contiguous().to(torch.float64).numpy().tobytes())
        return digest.hexdigest()[:16]

    @classmethod
    def from_tensors(cls, train: torch.Tensor, valid: torch.Tensor, test: torch.Tensor,
                     y_train: torch.Tensor | None = None, y_valid: torch.Tensor | None = None,
                     y_test: torch.Tensor | None = None) -> "Splits":
        """User data, checked: same sample shape in every split, finite values, labels per sample."""
        train_shape = tuple(torch.as_tensor(train).shape[1:])
        out = {}
        for name, x, y in zip(SPLIT_NAMES, (train, valid, test), (y_train, y_valid, y_test)):
            x = torch.as_tensor(x)
            if x.ndim < 2 or x.shape[0] == 0:
                raise DataError(f"{name} split must have shape (N, ...) with N > 0, got {tuple(x.shape)}")
            if tuple(x.shape[1:]) != train_shape:
                raise DataError(f"{name} split has sample shape {tuple(x.shape[1:])}, train has {train_shape}")
            x = x.detach().to(torch.float64).cpu().contiguous()
            if not torch.isfinite(x).all():
                raise DataError(f"{name} split contains NaN or infinite values")
            if y is not None:
                y = torch.as_tensor(y).to(torch.int64).reshape(-1)
                if y.shape[0] != x.shape[0]:
                    raise DataError(f"{name} labels: {y.shape[0]} for {x.shape[0]} samples")
            out[name], out[f"y_{name}"] = x, y
        return cls(**out)

    @classmethod
    def random_split(cls, x: torch.Tensor, n_valid: int, n_test: int, seed: int = 0,
                     y: torch.Tensor | None = None) -> "Splits":
        """Split one array into train / valid / test by a seeded permutation."""
        x = torch.as_tensor(x)
        n = x.shape[0]
        if n_valid + n_test >= n:
            raise DataError(f"n_valid + n_test = {n_valid + n_test} leaves no training data out of {n}")
        perm = permutation(n, seed)
        parts = perm[n_valid + n_test:], perm[:n_valid], perm[n_valid:n_valid + n_test]
        ys = [None] * 3 if y is None else [torch.as_tensor(y)[p] for p in parts]
        return dataclasses.replace(cls.from_tensors(*(x[p] for p in parts), *ys), keys=row_keys(parts))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field by name (samples, and labels where present): what a run saves."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
