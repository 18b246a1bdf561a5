"""Which files of an image folder or zip are images, how to read each one, and their labels.

A folder and a StyleGAN-style zip differ only in how names are listed and bytes read, so both become one
``Listing`` that decoding and ``export`` use alike; the label rules work on its keys.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError

# Pillow formats that only identify files or need external programs: never image data here.
NOT_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".eps", ".ps", ".mpeg", ".mpg", ".emf", ".wmf"}
DATASET_JSON = "dataset.json"
PILLOW_FORMATS = "PNG, JPEG, WebP, BMP, TIFF, ... anything Pillow opens"  # for "no images found" errors


def image_extensions() -> frozenset[str]:
    """Lower-case suffixes of every format Pillow can open (PNG, JPEG, WebP, BMP, TIFF, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(e for e, f in Image.registered_extensions().items() if f in Image.OPEN and e not in NOT_IMAGES)


@dataclass
class Listing:
    """The image files of a folder or zip, sorted by key, and how to read each one."""

    kind: str  # "folder" | "zip"
    path: Path
    keys: list[str]
    read: Callable[[str], bytes]
    dataset_json: bytes | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def member_name(self, key: str) -> str:
        """Where the file ``key`` is, for messages: a path, or ``archive.zip:member``."""
        return str(self.path / key) if self.kind == "folder" else f"{self.path}:{key}"


def _visible(parts: tuple[str, ...]) -> bool:
    """No hidden file or folder on the path, and no macOS resource-fork folder."""
    return not any(part.startswith(".") or part == "__MACOSX" for part in parts)


def list_folder(root: Path) -> Listing:
    """Every visible image file under ``root``, symlinks followed (each real folder once)."""
    extensions = image_extensions()
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
        for filename in filenames:
            if _visible((filename,)) and Path(filename).suffix.lower() in extensions:
                keys.append((rel_dir / filename).as_posix())
    meta = root / DATASET_JSON
    return Listing("folder", root, sorted(keys), lambda key: (root / key).read_bytes(),
                   meta.read_bytes() if meta.is_file() else None)


def list_zip(path: Path) -> Listing:
    """Every visible image member of a zip; the archive stays open until ``close``."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from None
    extensions = image_extensions()
    names = archive.namelist()
    keys = sorted(n for n in names
                  if not n.endswith("/") and _visible(tuple(n.split("/"))) and Path(n).suffix.lower() in extensions)

    def read(key: str) -> bytes:
        try:
            return archive.read(key)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise OSError(f"damaged zip member ({e})") from None

    meta = archive.read(DATASET_JSON) if DATASET_JSON in names else None
    return Listing("zip", path, keys, read, meta, archive.close)


def open_listing(path: Path) -> Listing:
    """The listing of a folder or a .zip (array files are read elsewhere)."""
    if path.is_dir():
        return list_folder(path)
    if path.suffix.lower() == ".zip":
        return list_zip(path)
    raise DataError(f"data.path = {str(path)!r} is neither a directory nor a .zip, .npy or .npz file")


def dataset_json_label_array(listing: Listing, keys: list[str], source: str) -> np.ndarray | None:
    """Labels of ``keys`` from the listing's ``dataset.json`` (``{"labels": [[key, int], ...]}``);
    None without one or with ``{"labels": null}``."""
    if listing.dataset_json is None:
        return None
    try:
        meta = json.loads(listing.dataset_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{source}/{DATASET_JSON}: not valid JSON ({e})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise DataError(f"{source}/{DATASET_JSON}: 'labels' must be a list of [path, label] pairs or null")
    table = {}
    for item in labels:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and item[1] >= 0):
            raise DataError(f"{source}/{DATASET_JSON}: each label must be [\"relative/path.png\", "
                            f"non-negative integer], got {item!r}")
        table[item[0]] = item[1]
    missing = [k for k in keys if k not in table]
    if missing:
        raise DataError(f"{source}/{DATASET_JSON} has no label for {missing[0]!r} ({len(missing)} image(s) unlabelled)")
    return np.array([table[k] for k in keys], dtype=np.int64)


def folder_labels(keys: list[str], source: str) -> tuple[np.ndarray, list[str]]:
    """The ImageFolder convention: class = sorted index of the first-level subfolder name."""
    top = [k for k in keys if "/" not in k]
    if top:
        raise DataError(f"{source}: data.labels = 'folders' needs every image inside a class subfolder; "
                        f"{top[0]!r} is at the top level")
    names = sorted({k.split("/", 1)[0] for k in keys})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[k.split("/", 1)[0]] for k in keys], dtype=np.int64), names
