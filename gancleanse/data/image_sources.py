"""One image source read whole: a folder or zip decoded file by file, or a .npy/.npz array.

Both end as the same ``Images`` (pixels, labels, keys, and a description carrying a digest of the bytes),
so the loader splits and checks them alike; ``export`` rereads an array file the way training read it.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError, GancleanseWarning
from ..integrity import sha256_file
from .image_convert import Converter, channels_first, convert_array
from .image_listing import (DATASET_JSON, PILLOW_FORMATS, Listing, dataset_json_label_array, dataset_json_labels,
                            folder_labels, open_listing)
from .images import as_labels, check_npz_members
from .source_check import SourceDigest, row_hashes

MAX_REPORTED = 5  # skipped files named in a warning


@dataclass
class Images:
    """Every readable image of one source, in key order, before any split."""

    x: np.ndarray  # (N, C, H, W) uint8, or float as stored in an array file
    y: np.ndarray | None
    keys: list[str]
    source: dict


class PixelBuffer:
    """Decoded images and their keys, written row by row into one preallocated uint8 array. The channel
    count grows from 1 to 3 when a first colour image arrives (unless ``channels`` is fixed): gray rows are
    then repeated, which is exactly Pillow's L->RGB."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: np.ndarray | None = None
        self.keys: list[str] = []

    def add(self, img: np.ndarray, key: str) -> None:
        """Append one (C, H, W) image; every image must have the first one's height and width."""
        if self.data is None:
            self.data = np.empty((self.capacity, *img.shape), dtype=np.uint8)
        elif img.shape[1:] != self.data.shape[2:]:
            raise DataError(f"images of different sizes: {self.keys[0]!r} is {self.data.shape[3]}x"
                            f"{self.data.shape[2]}, {key!r} is {img.shape[2]}x{img.shape[1]}; set "
                            "data.image_size to resize them all to one square size")
        if img.shape[0] != self.data.shape[1]:
            if img.shape[0] == 3:
                self.data = np.repeat(self.data, 3, axis=1)
            else:
                img = np.repeat(img, 3, axis=0)
        self.data[len(self.keys)] = img
        self.keys.append(key)

    def array(self) -> np.ndarray:
        """The rows filled so far (a view)."""
        assert self.data is not None
        return self.data[:len(self.keys)]


def decode_files(listing: Listing, cfg: DataConfig, progress: bool = False
                 ) -> tuple[np.ndarray, list[str], list[tuple[str, str]], SourceDigest]:
    """Decode every listed file: (pixels (N, C, S, S), kept keys, skipped (key, reason), hashes). The hashes, a
    sha256 over every listed file's key and bytes (and dataset.json) and a short one per key, change when any file
    does. A file that cannot be read or decoded is an error naming it, unless ``skip_bad_files``; no image at all
    is an error."""
    from PIL import Image
    from tqdm.auto import tqdm

    convert = Converter(cfg)
    sums = SourceDigest(listing.dataset_json)
    buffer, skipped = PixelBuffer(len(listing.keys)), []
    for key in tqdm(listing.keys, desc="read images", unit="img", disable=not progress, leave=False):
        try:
            raw = listing.read(key)
        except OSError as e:  # a dangling symlink, a FIFO, a damaged zip member
            if not cfg.skip_bad_files:
                raise DataError(f"{listing.path}: cannot read {key!r} ({e.strerror or e}); fix or remove it, or "
                                "set data.skip_bad_files = true") from None
            skipped.append((key, f"cannot read: {e.strerror or e}"))
            sums.add(key, None)
            continue
        sums.add(key, hashlib.sha256(raw).digest())
        try:
            img = convert(raw)
        except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as e:
            reason = f"{type(e).__name__}: {e}"
            if not cfg.skip_bad_files:
                raise DataError(f"{listing.member_name(key)}: not a readable image ({reason}); fix or remove "
                                "it, or set data.skip_bad_files = true") from None
            skipped.append((key, reason))
            continue
        buffer.add(img, key)
    if not buffer.keys:
        what = "readable images" if listing.keys else "image files"
        raise DataError(f"{listing.path}: no {what} found" + (
            f" ({len(skipped)} unreadable)" if skipped else f" ({PILLOW_FORMATS})"))
    return buffer.array(), buffer.keys, skipped, sums


def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(images, labels or None, array name in the .npz) of a .npy or .npz file. Every array of an .npz must be
    numeric (``export`` copies them all): an object array is refused here, naming it."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable {path.suffix} file ({e})") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None, None
    with loaded as f:
        names = set(f.files)
        name = "x" if "x" in names else "arr_0" if "arr_0" in names else None
        if name is None:
            raise DataError(f"{path}: no image array named 'x' or 'arr_0' (found: "
                            f"{', '.join(sorted(names)) or 'none'})")
        check_npz_members(path, f.zip)
        try:
            return f[name], (f["y"] if "y" in names else None), name
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: damaged array ({e})") from None


def read_source(path_text: str, cfg: DataConfig, role: str, progress: bool = False) -> Images:
    """A folder, zip, .npy or .npz, decoded and converted by the config ("data.path" is ``role``)."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(f"{role} not found: {path}")
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        return _read_array_source(cfg, path)
    listing = open_listing(path)
    meta = listing.member_name(DATASET_JSON)
    try:  # dataset.json is checked whatever data.labels says: export filters it
        table = None if listing.dataset_json is None else dataset_json_labels(listing.dataset_json, meta)
        x, keys, skipped, sums = decode_files(listing, cfg, progress)
    finally:
        listing.close()
    labels, label_names = None, None
    if cfg.labels == "folders":
        labels, label_names = folder_labels(keys, str(path))
    elif cfg.labels == "auto":
        labels = dataset_json_label_array(table, keys, meta)
    if skipped:
        names = ", ".join(f"{key} ({reason})" for key, reason in skipped[:MAX_REPORTED])
        more = f" and {len(skipped) - MAX_REPORTED} more" if len(skipped) > MAX_REPORTED else ""
        warnings.warn(f"{path}: skipped {len(skipped)} unreadable image file(s): {names}{more}",
                      GancleanseWarning, stacklevel=2)
    source = {"format": listing.kind, "path": str(path.resolve()), "n_files": len(listing.keys),
              "n_read": len(keys), "skipped": [list(s) for s in skipped], "digest": sums.hexdigest(),
              "has_dataset_json": listing.dataset_json is not None, "label_names": label_names,
              "labels": "none" if labels is None else cfg.labels if cfg.labels != "auto" else DATASET_JSON,
              "sha256": sums.keys}
    return Images(x, labels, keys, source)


def _read_array_source(cfg: DataConfig, path: Path) -> Images:
    """A .npy or .npz: rows keyed ``#i``, labels from ``y``, digest of the file's bytes."""
    raw, y, name = read_array_file(path)
    source_name = f"{path}:{name}" if name else str(path)
    if cfg.labels == "folders":
        raise ConfigError(f"data.labels = 'folders' needs an image folder or zip; {path} is an array file")
    rows = row_hashes(raw, y)
    x = convert_array(channels_first(raw, source_name), cfg, source_name)
    del raw
    labels = as_labels(y, x.shape[0], f"{path}:y").numpy() if y is not None and cfg.labels != "none" else None
    if not x.flags.writeable:
        x = x.copy()
    digest = sha256_file(path)
    source = {"format": path.suffix.lower()[1:], "path": str(path.resolve()), "array": name,
              "n_files": 1, "n_read": int(x.shape[0]), "skipped": [], "digest": digest,
              "labels": "none" if labels is None else "y", "label_names": None, "rows": rows}
    return Images(x, labels, [f"#{i}" for i in range(x.shape[0])], source)
