"""A user's image dataset as it is on disk: a folder, a StyleGAN-style zip, or .npy/.npz arrays.

``[data] name = "images"`` reads ``data.path``:

- a directory, searched recursively for files Pillow opens (hidden files and folders
  skipped), instances sorted by relative path; labels from the first-level subfolder
  names with ``labels = "folders"``, or from a ``dataset.json`` at its root;
- a ``.zip`` as written by StyleGAN2-ADA/StyleGAN3's dataset tool (images at any depth,
  optional ``dataset.json`` of ``{"labels": [["rel/path.png", 3], ...]}`` or
  ``{"labels": null}``);
- a ``.npy`` array, or an ``.npz`` with the images as ``x`` or ``arr_0`` (uint8 or float,
  NHWC or NCHW) and optional labels ``y``.

Every image is converted to ``channels`` (1 or 3; by default 1 when all are grayscale,
else 3) and, with ``image_size``, resized so that its short side is ``image_size`` with
the ``resample`` filter and centre-cropped to a square. Pixels stay uint8 in memory
(``as_float`` maps them to [-1, 1] per minibatch). Every instance keeps a stable key: its
relative path (forward slashes), or ``#i`` for row ``i`` of an array. The fingerprint
covers the files' bytes, so a changed dataset is caught when a run is reopened.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError, GancleanseWarning
from .base import Splits
from .images import as_labels, check_pixel_values, permutation, split_counts

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# Pillow formats that only identify files or need external programs: never image data here.
NOT_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".eps", ".ps", ".mpeg", ".mpg", ".emf", ".wmf"}
DATASET_JSON = "dataset.json"
MAX_REPORTED = 5  # skipped files named in a warning


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes of every format Pillow can open (PNG, JPEG, WebP, BMP, TIFF, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(e for e, f in Image.registered_extensions().items()
                     if f in Image.OPEN and e not in NOT_IMAGES)


def resample_filter(name: str) -> int:
    from PIL import Image

    return {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
            "hamming": Image.Resampling.HAMMING, "nearest": Image.Resampling.NEAREST}[name]


# --------------------------------------------------------------------------- listing
@dataclass
class Listing:
    """The image files of a folder or zip, sorted by key, and how to read each one."""

    kind: str  # "folder" | "zip"
    path: Path
    keys: list[str]
    read: Callable[[str], bytes]
    dataset_json: bytes | None = None
    close: Callable[[], None] = field(default=lambda: None)


def _visible(parts: tuple[str, ...]) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def list_folder(root: Path) -> Listing:
    exts = image_extensions()
    keys = []
    seen: set[str] = set()  # real paths of folders walked: a symlink loop is walked once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if _visible((d,)))
        rel_dir = Path(dirpath).relative_to(root)
        for f in filenames:
            if _visible((f,)) and Path(f).suffix.lower() in exts:
                keys.append((rel_dir / f).as_posix())
    keys.sort()
    meta = root / DATASET_JSON
    return Listing("folder", root, keys, lambda key: (root / key).read_bytes(),
                   meta.read_bytes() if meta.is_file() else None)


def list_zip(path: Path) -> Listing:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from None
    exts = image_extensions()
    keys = sorted(n for n in archive.namelist()
                  if not n.endswith("/") and _visible(tuple(n.split("/"))) and Path(n).suffix.lower() in exts)
    names = set(archive.namelist())

    def read(key: str) -> bytes:
        try:
            return archive.read(key)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise OSError(f"damaged zip member ({e})") from None

    meta = archive.read(DATASET_JSON) if DATASET_JSON in names else None
    return Listing("zip", path, keys, read, meta, archive.close)


def open_listing(path: Path) -> Listing:
    if path.is_dir():
        return list_folder(path)
    if path.suffix.lower() == ".zip":
        return list_zip(path)
    raise DataError(f"data.path = {str(path)!r} is neither a directory nor a .zip, .npy or .npz file")


# ---------------------------------------------------------------------------- labels
def dataset_json_labels(raw: bytes, source: str) -> dict[str, int] | None:
    """``{"labels": [[key, int], ...]}`` -> {key: label}; ``{"labels": null}`` -> None."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{source}/{DATASET_JSON}: not valid JSON ({e})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise DataError(f"{source}/{DATASET_JSON}: 'labels' must be a list of [path, label] pairs or null")
    out = {}
    for item in labels:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
            raise DataError(f"{source}/{DATASET_JSON}: each label must be [\"relative/path.png\", "
                            f"non-negative integer], got {item!r}")
        out[item[0]] = item[1]
    return out


def folder_labels(keys: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    """The ImageFolder convention: class = sorted index of the first-level subfolder name."""
    top = [k for k in keys if "/" not in k]
    if top:
        raise DataError(f"{source}: data.labels = 'folders' needs every image inside a class subfolder; "
                        f"{top[0]!r} is at the top level")
    names = sorted({k.split("/", 1)[0] for k in keys})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[k.split("/", 1)[0]] for k in keys], dtype=np.int64), names


# -------------------------------------------------------------------------- decoding
class Converter:
    """One image file -> (C, S, S) uint8, by the config's channels, size and filter."""

    def __init__(self, cfg: DataConfig) -> None:
        self.channels = cfg.channels
        self.size = cfg.image_size
        self.filter = resample_filter(cfg.resample)

    def __call__(self, raw: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            mode = self.channels_mode(img.mode)
            if img.mode.startswith("I"):  # 16-bit gray: scale to 8 bits (Pillow's convert would clip)
                a16 = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(np.round(a16 / 257.0), 0, 255).astype(np.uint8), mode="L")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert(mode)
            if self.size is not None:
                img = self.resize(img)
            a = np.asarray(img, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def channels_mode(self, mode: str) -> str:
        if self.channels == 1:
            return "L"
        if self.channels == 3:
            return "RGB"
        return "L" if mode in GRAY_MODES else "RGB"

    def resize(self, img):  # noqa: ANN001, ANN201 - PIL images, imported lazily
        """Short side to ``size`` with the filter, then the central ``size`` x ``size`` square."""
        w, h = img.size
        s = self.size
        if (w, h) == (s, s):
            return img
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), self.filter)
        left, top = (nw - s) // 2, (nh - s) // 2
        return img.crop((left, top, left + s, top + s))


class PixelBuffer:
    """Decoded images written row by row into one preallocated uint8 array.

    The channel count grows from 1 to 3 the first time a colour image arrives (only when
    ``channels`` is not fixed); gray rows are then repeated, which is exactly Pillow's L->RGB.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: np.ndarray | None = None
        self.count = 0
        self.first_key = ""

    def add(self, img: np.ndarray, key: str) -> None:
        if self.data is None:
            self.data = np.empty((self.capacity, *img.shape), dtype=np.uint8)
            self.first_key = key
        elif img.shape[1:] != self.data.shape[2:]:
            raise DataError(f"images of different sizes: {self.first_key!r} is {self.data.shape[3]}x"
                            f"{self.data.shape[2]}, {key!r} is {img.shape[2]}x{img.shape[1]}; set "
                            "data.image_size to resize them all to one square size")
        if img.shape[0] != self.data.shape[1]:
            if img.shape[0] == 3:
                self.data = np.repeat(self.data, 3, axis=1)
            else:
                img = np.repeat(img, 3, axis=0)
        self.data[self.count] = img
        self.count += 1

    def array(self) -> np.ndarray:
        assert self.data is not None
        return self.data[:self.count]


def decode_files(listing: Listing, cfg: DataConfig, progress: bool = False
                 ) -> tuple[np.ndarray, list[str], list[tuple[str, str]], str]:
    """Decode every listed file: (pixels (N, C, S, S), kept keys, skipped (key, reason), digest).

    The digest is a sha256 over every listed file's key and bytes (and dataset.json), so
    it changes when any file does. A file that cannot be decoded is an error naming it,
    unless ``skip_bad_files``.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    convert = Converter(cfg)
    digest = hashlib.sha256()
    if listing.dataset_json is not None:
        digest.update(DATASET_JSON.encode() + b"\0" + hashlib.sha256(listing.dataset_json).digest())
    buffer = PixelBuffer(len(listing.keys))
    kept, skipped = [], []
    for key in tqdm(listing.keys, desc="read images", unit="img", disable=not progress, leave=False):
        try:
            raw = listing.read(key)
        except OSError as e:
            raise DataError(f"{listing.path}: cannot read {key!r} ({e})") from None
        digest.update(key.encode() + b"\0" + hashlib.sha256(raw).digest())
        try:
            img = convert(raw)
        except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as e:
            reason = f"{type(e).__name__}: {e}"
            if not cfg.skip_bad_files:
                raise DataError(f"{_join(listing, key)}: not a readable image ({reason}); fix or remove it, "
                                "or set data.skip_bad_files = true") from None
            skipped.append((key, reason))
            continue
        buffer.add(img, key)
        kept.append(key)
    if not kept:
        what = "readable images" if listing.keys else "image files"
        raise DataError(f"{listing.path}: no {what} found" + (
            f" ({len(skipped)} unreadable)" if skipped else " (PNG, JPEG, WebP, BMP, TIFF, ... anything Pillow opens)"))
    return buffer.array(), kept, skipped, digest.hexdigest()


def _join(listing: Listing, key: str) -> str:
    return str(listing.path / key) if listing.kind == "folder" else f"{listing.path}:{key}"


# ---------------------------------------------------------------------------- arrays
def read_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(images, labels or None, array name in the .npz) of a .npy or .npz file."""
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
        try:
            return f[name], (f["y"] if "y" in names else None), name
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: damaged array ({e})") from None


def channels_first(x: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4 -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{source}: expected images of shape (N, H, W), (N, C, H, W) or (N, H, W, C), "
                        f"got {tuple(x.shape)}")
    first, last = x.shape[1] in (1, 3, 4), x.shape[3] in (1, 3, 4)
    if first and last:  # both could be channels: the layout whose images are square wins
        last = x.shape[1] == x.shape[2] and x.shape[2] != x.shape[3]
        first = not last
    if first:
        return x
    if last:
        return x.transpose(0, 3, 1, 2)
    raise DataError(f"{source}: images of shape {tuple(x.shape)} have no channel axis of size 1, 3 or 4 "
                    "(first or last after N)")


def convert_array(x: np.ndarray, cfg: DataConfig, source: str) -> np.ndarray:
    """Channels and size of an (N, C, H, W) array by the config; uint8 stays uint8."""
    if x.shape[0] == 0 or min(x.shape[2:]) == 0:
        raise DataError(f"{source}: empty image array of shape {tuple(x.shape)}")
    check_pixel_values(x, source)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.uint8, copy=False)
    if x.shape[1] == 4:
        x = x[:, :3]  # alpha dropped, as Pillow's RGBA -> RGB
    target = cfg.channels or x.shape[1]
    if target != x.shape[1]:
        x = _to_gray(x) if target == 1 else np.repeat(x, 3, axis=1)
    size = cfg.image_size
    if size is not None and tuple(x.shape[2:]) != (size, size):
        x = _resize_array(x, cfg)
    return np.ascontiguousarray(x)


def _to_gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as Pillow's RGB -> L (integer rounding for uint8)."""
    if x.dtype == np.uint8:
        w = x.astype(np.uint32)
        return ((w[:, 0] * 19595 + w[:, 1] * 38470 + w[:, 2] * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].astype(x.dtype)


def _resize_array(x: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Each image through the same short-side resize and centre crop as image files."""
    from PIL import Image

    convert = Converter(cfg)
    s = cfg.image_size
    out = np.empty((x.shape[0], x.shape[1], s, s), dtype=x.dtype)
    for i, img in enumerate(x):
        if x.dtype == np.uint8:
            pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            a = np.asarray(convert.resize(pil))
            out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        else:  # float channels one at a time in Pillow's 32-bit float mode
            for c in range(img.shape[0]):
                out[i, c] = np.asarray(convert.resize(Image.fromarray(img[c].astype(np.float32), mode="F")))
    return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- split
def permute_in_place(x: np.ndarray, order: np.ndarray) -> None:
    """``x[:] = x[order]`` with one row of extra memory (cycle following), for big pixel arrays."""
    n = len(order)
    done = np.zeros(n, dtype=bool)
    tmp = np.empty_like(x[0])
    for start in range(n):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        tmp[...] = x[start]
        i = start
        while True:
            j = order[i]
            done[i] = True
            if j == start:
                x[i] = tmp
                break
            x[i] = x[j]
            i = j


def split_pixels(cfg: DataConfig, x: np.ndarray, y: np.ndarray | None, keys: list[str],
                 source: dict, what: str) -> Splits:
    """Seeded train / valid / test of ``x`` without copying it: rows are permuted in place."""
    n_train, n_valid, n_test = split_counts(cfg, x.shape[0], what)
    order = permutation(x.shape[0], cfg.seed).numpy()
    permute_in_place(x, order)
    keys = [keys[i] for i in order]
    y = y[order] if y is not None else None
    a, b, c = n_train, n_train + n_valid, n_train + n_valid + n_test
    t = torch.from_numpy(x)
    yt = torch.from_numpy(y) if y is not None else None
    ys = (yt[:a], yt[a:b], yt[b:c]) if yt is not None else (None, None, None)
    return Splits(t[:a], t[a:b], t[b:c], *ys, keys={"train": keys[:a], "valid": keys[a:b], "test": keys[b:c]},
                  source=source)


# ------------------------------------------------------------------------------ main
@dataclass
class Images:
    """Every readable image of one source, in key order, before any split."""

    x: np.ndarray  # (N, C, H, W) uint8, or float as stored in an array file
    y: np.ndarray | None
    keys: list[str]
    source: dict


def read_source(path_text: str, cfg: DataConfig, role: str, progress: bool = False) -> Images:
    """A folder, zip, .npy or .npz, decoded and converted by the config ("data.path" is ``role``)."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(f"{role} not found: {path}")
    if path.is_file() and path.suffix.lower() in (".npy", ".npz"):
        return _read_array_source(cfg, path)
    listing = open_listing(path)
    try:
        if not listing.keys:
            raise DataError(f"{path}: no image files found (PNG, JPEG, WebP, BMP, TIFF, ... anything Pillow opens)")
        x, keys, skipped, digest = decode_files(listing, cfg, progress)
    finally:
        listing.close()
    labels, label_names = None, None
    if cfg.labels == "folders":
        labels, label_names = folder_labels(keys, str(path))
    elif cfg.labels == "auto" and listing.dataset_json is not None:
        table = dataset_json_labels(listing.dataset_json, str(path))
        if table is not None:
            missing = [k for k in keys if k not in table]
            if missing:
                raise DataError(f"{path}/{DATASET_JSON} has no label for {missing[0]!r} "
                                f"({len(missing)} image(s) unlabelled)")
            labels = np.array([table[k] for k in keys], dtype=np.int64)
    if skipped:
        names = ", ".join(f"{k} ({r})" for k, r in skipped[:MAX_REPORTED])
        more = f" and {len(skipped) - MAX_REPORTED} more" if len(skipped) > MAX_REPORTED else ""
        warnings.warn(f"{path}: skipped {len(skipped)} unreadable image file(s): {names}{more}",
                      GancleanseWarning, stacklevel=2)
    source = {"format": listing.kind, "path": str(path.resolve()), "n_files": len(listing.keys),
              "n_read": len(keys), "skipped": [list(s) for s in skipped], "digest": digest,
              "has_dataset_json": listing.dataset_json is not None, "label_names": label_names,
              "labels": "none" if labels is None else cfg.labels if cfg.labels != "auto" else DATASET_JSON}
    return Images(x, labels, keys, source)


def _read_array_source(cfg: DataConfig, path: Path) -> Images:
    raw, y, name = read_array_file(path)
    source_name = f"{path}:{name}" if name else str(path)
    if cfg.labels == "folders":
        raise ConfigError(f"data.labels = 'folders' needs an image folder or zip; {path} is an array file")
    x = convert_array(channels_first(raw, source_name), cfg, source_name)
    del raw
    labels = as_labels(y, x.shape[0], f"{path}:y").numpy() if y is not None and cfg.labels != "none" else None
    if not x.flags.writeable:
        x = x.copy()
    source = {"format": path.suffix.lower()[1:], "path": str(path.resolve()), "array": name,
              "n_files": 1, "n_read": int(x.shape[0]), "skipped": [], "digest": _file_digest(path),
              "labels": "none" if labels is None else "y", "label_names": None}
    return Images(x, labels, [f"#{i}" for i in range(x.shape[0])], source)


def _match_channels(a: Images, b: Images) -> None:
    """Training and reference images with different default channel counts: both become RGB."""
    for img in (a, b):
        if img.x.shape[1] == 1 and max(a.x.shape[1], b.x.shape[1]) == 3:
            img.x = np.repeat(img.x, 3, axis=1)
    if a.x.shape[1:] != b.x.shape[1:]:
        raise DataError(f"training images are {tuple(a.x.shape[1:])} but reference images are "
                        f"{tuple(b.x.shape[1:])}; set data.image_size (and data.channels) to make them alike")


def load_images(cfg: DataConfig, progress: bool = False) -> Splits:
    """The seeded train / valid / test split of ``data.path`` (uint8; float arrays keep their dtype).

    With ``data.reference_path`` the validation and test splits are drawn from that
    dataset instead (a curated set to measure against), and the training split is all of
    ``data.path`` (or a seeded ``n_train`` of it).
    """
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
    tr = _seeded_rows(train, n_train, cfg.seed)
    ev = _seeded_rows(ref, cfg.n_valid + cfg.n_test, cfg.seed)
    a = cfg.n_valid
    source = dict(train.source, reference=ref.source,
                  digest=hashlib.sha256((train.source["digest"] + ref.source["digest"]).encode()).hexdigest())
    ys = (None, None, None) if tr.y is None else (torch.from_numpy(tr.y), torch.from_numpy(ev.y[:a]),
                                                  torch.from_numpy(ev.y[a:]))
    xe = torch.from_numpy(ev.x)
    return Splits(torch.from_numpy(tr.x), xe[:a], xe[a:], *ys,
                  keys={"train": tr.keys, "valid": ev.keys[:a], "test": ev.keys[a:]}, source=source)


def _seeded_rows(images: Images, n: int, seed: int) -> Images:
    """``n`` rows of a seeded permutation; all rows in key order when ``n`` is everything."""
    if n == images.x.shape[0]:
        return images
    order = permutation(images.x.shape[0], seed).numpy()[:n]
    return Images(images.x[order], None if images.y is None else images.y[order],
                  [images.keys[i] for i in order], images.source)
