"""A user's image dataset as it is on disk: a folder, a StyleGAN-style zip, or .npy/.npz arrays.

``[data] name = "images"`` reads ``data.path``: a directory searched recursively for files Pillow opens (hidden
ones skipped; labels from first-level subfolders with ``labels = "folders"``, or from a ``dataset.json`` at its
root); a ``.zip`` as StyleGAN2-ADA/StyleGAN3's dataset tool writes it (optional ``dataset.json`` of
``{"labels": [["rel/path.png", 3], ...]}`` or ``{"labels": null}``); or a ``.npy`` array, or an ``.npz`` with
the images as ``x`` or ``arr_0`` (uint8 or float, NHWC or NCHW) and labels ``y``. Each instance's key is its
relative path (forward slashes), or ``#i`` for row ``i`` of an array; the fingerprint covers the files' bytes.

This module owns the split (in place, for big pixel arrays) and the reference dataset; ``image_listing`` lists
folders and zips, ``image_convert`` converts pixels (channels, size), ``image_sources`` reads one source.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .base import SPLIT_NAMES, Splits, permutation
from .image_sources import Images, read_source
from .images import split_counts

__all__ = ["Images", "load_images", "permute_in_place", "read_source", "split_pixels"]


def permute_in_place(x: np.ndarray, order: np.ndarray) -> None:
    """``x[:] = x[order]`` with one row of extra memory (cycle following), for big pixel arrays."""
    done = np.zeros(len(order), dtype=bool)
    held = np.empty_like(x[0])  # each cycle's first row, saved before its place is overwritten
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        held[...] = x[start]
        i = start
        while order[i] != start:
            done[i] = True
            x[i] = x[order[i]]
            i = order[i]
        done[i] = True
        x[i] = held


def _as_splits(parts: list[tuple[Images, slice]], source: dict) -> Splits:
    """Train / valid / test as row ranges of ``Images``: tensors share the arrays' memory."""
    return Splits(*(torch.from_numpy(images.x[rows]) for images, rows in parts),
                  *(None if images.y is None else torch.from_numpy(images.y[rows]) for images, rows in parts),
                  keys={name: images.keys[rows] for name, (images, rows) in zip(SPLIT_NAMES, parts)}, source=source)


def split_pixels(cfg: DataConfig, x: np.ndarray, y: np.ndarray | None, keys: list[str],
                 source: dict, what: str) -> Splits:
    """Seeded train / valid / test of ``x`` without copying it: rows are permuted in place."""
    n_train, n_valid, n_test = split_counts(cfg, x.shape[0], what)
    order = permutation(x.shape[0], cfg.seed).numpy()
    permute_in_place(x, order)
    ordered = Images(x, None if y is None else y[order], [keys[i] for i in order], source)
    end_valid = n_train + n_valid
    return _as_splits([(ordered, slice(0, n_train)), (ordered, slice(n_train, end_valid)),
                       (ordered, slice(end_valid, end_valid + n_test))], source)


def _match_channels(train: Images, reference: Images) -> None:
    """Training and reference images with different default channel counts: both become RGB."""
    for images in (train, reference):
        if images.x.shape[1] == 1 and max(train.x.shape[1], reference.x.shape[1]) == 3:
            images.x = np.repeat(images.x, 3, axis=1)
    if train.x.shape[1:] != reference.x.shape[1:]:
        raise DataError(f"training images are {tuple(train.x.shape[1:])} but reference images are "
                        f"{tuple(reference.x.shape[1:])}; set data.image_size (and data.channels) to make them alike")


def load_images(cfg: DataConfig, progress: bool = False) -> Splits:
    """The seeded train / valid / test split of ``data.path`` (uint8; float arrays keep their dtype). With
    ``data.reference_path`` the validation and test splits are drawn from that dataset instead (a curated set
    to measure against), and the training split is all of ``data.path`` (or a seeded ``n_train``)."""
    if not cfg.path:
        raise ConfigError("data.name = 'images' needs data.path (an image folder, a .zip, or a .npy/.npz file)")
    train = read_source(cfg.path, cfg, "data.path", progress)
    if cfg.reference_path is None:
        return split_pixels(cfg, train.x, train.y, train.keys, train.source, str(cfg.path))
    ref = read_source(cfg.reference_path, cfg, "data.reference_path", progress)
    _match_channels(train, ref)
    if (train.y is None) != (ref.y is None):
        raise DataError("data.path and data.reference_path must both have labels or both have none "
                        f"(labels = {cfg.labels!r})")
    n_train = cfg.n_train if cfg.n_train is not None else train.x.shape[0]
    if n_train > train.x.shape[0]:
        raise DataError(f"data.n_train = {n_train} exceeds the {train.x.shape[0]} images in {cfg.path}")
    if cfg.n_valid + cfg.n_test > ref.x.shape[0]:
        raise DataError(f"data.n_valid = {cfg.n_valid} + data.n_test = {cfg.n_test} exceeds the "
                        f"{ref.x.shape[0]} images in {cfg.reference_path}")
    evaluation = _seeded_rows(ref, cfg.n_valid + cfg.n_test, cfg.seed)
    source = dict(train.source, reference=ref.source,
                  digest=hashlib.sha256((train.source["digest"] + ref.source["digest"]).encode()).hexdigest())
    return _as_splits([(_seeded_rows(train, n_train, cfg.seed), slice(None)), (evaluation, slice(0, cfg.n_valid)),
                       (evaluation, slice(cfg.n_valid, None))], source)


def _seeded_rows(images: Images, n: int, seed: int) -> Images:
    """``n`` rows of a seeded permutation; all rows in key order when ``n`` is everything."""
    if n == images.x.shape[0]:
        return images
    order = permutation(images.x.shape[0], seed).numpy()[:n]
    return Images(images.x[order], None if images.y is None else images.y[order],
                  [images.keys[i] for i in order], images.source)
