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
from typing import IO, Callable

import numpy as np

from ..errors import DataError
from ..integrity import open_regular
from .base import MAX_LABEL

# Pillow formats that only identify files or need external programs: never image data here.
NOT_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".eps", ".ps", ".mpeg", ".mpg", ".emf", ".wmf"}
DATASET_JSON = "dataset.json"
PILLOW_FORMATS = "PNG, JPEG, WebP, BMP, TIFF, ... anything Pillow opens"  # for "no images found" errors
READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)  # what reading one file or member can raise


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
    open: Callable[[str], IO[bytes]]  # a binary stream of one file's bytes (hashing streams; decoding reads it whole)
    dataset_json: bytes | None = None
    close: Callable[[], None] = field(default=lambda: None)

    def read(self, key: str) -> bytes:
        """The bytes of the file ``key``; an OSError when it cannot be read (a damaged zip member included)."""
        try:
            with self.open(key) as f:
                return f.read()
        except READ_ERRORS as e:
            if isinstance(e, OSError):
                raise
            raise OSError(f"damaged zip member ({e})") from None

    def member_name(self, key: str) -> str:
        """Where the file ``key`` is, for messages: a path, or ``archive.zip:member``."""
        return str(self.path / key) if self.kind == "folder" else f"{self.path}:{key}"


def _utf8_key(key: str, where: Path) -> str:
    """A key is written to JSON and CSV files as UTF-8: a name whose bytes are not UTF-8 is refused."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: the file name {ascii(key)} is not valid UTF-8; rename it") from None
    return key


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
                keys.append(_utf8_key((rel_dir / filename).as_posix(), root))
    meta, meta_bytes = root / DATASET_JSON, None
    if meta.is_file():
        try:
            with open_regular(meta) as f:
                meta_bytes = f.read()
        except OSError as e:
            raise DataError(f"{meta}: cannot read it ({e.strerror or e})") from None
    return Listing("folder", root, sorted(keys), lambda key: open_regular(root / key), meta_bytes)


def list_zip(path: Path) -> Listing:
    """Every visible image member of a zip; the archive stays open until ``close``."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e})") from None
    except UnicodeDecodeError as e:  # a member name flagged UTF-8 that is not
        raise DataError(f"{path}: a member name is not valid UTF-8 ({ascii(e.object[:200])}); rename it") from None
    extensions = image_extensions()
    names = archive.namelist()
    keys = sorted(n for n in names
                  if not n.endswith("/") and _visible(tuple(n.split("/"))) and Path(n).suffix.lower() in extensions)
    used = set(keys) | {DATASET_JSON}
    seen: set[str] = set()
    for name in names:  # zipfile reads the last of two same-named members: which one the user meant is unknown
        if name in seen and name in used:
            archive.close()
            raise DataError(f"{path}: the member {name!r} appears twice in the zip; keep one of them")
        seen.add(name)
    listing = Listing("zip", path, keys, archive.open, None, archive.close)
    if DATASET_JSON in names:
        try:
            listing.dataset_json = listing.read(DATASET_JSON)
        except OSError as e:
            archive.close()
            raise DataError(f"{path}:{DATASET_JSON}: cannot read it ({e})") from None
    return listing


def open_listing(path: Path) -> Listing:
    """The listing of a folder or a .zip (array files are read elsewhere)."""
    if path.is_dir():
        return list_folder(path)
    if path.suffix.lower() == ".zip":
        return list_zip(path)
    raise DataError(f"data.path = {str(path)!r} is neither a directory nor a .zip, .npy or .npz file")


def dataset_json_labels(raw: bytes, where: str) -> dict[str, int] | None:
    """{key: label} of a dataset.json (``{"labels": [["rel/path.png", 3], ...]}``), None for ``{"labels": null}``.
    Checked when it enters (``train``), so that ``export`` can filter it later: JSON, that structure, each key
    once, each label an integer in 0 .. MAX_LABEL - 1."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: must be a JSON object like {{\"labels\": [...]}}, got a {type(meta).__name__}")
    labels = meta.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise DataError(f"{where}: 'labels' must be a list of [path, label] pairs or null")
    table: dict[str, int] = {}
    for i, item in enumerate(labels):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            raise DataError(f"{where}: labels[{i}] must be [\"relative/path.png\", integer label], "
                            f"got {repr(item)[:80]}")
        if not 0 <= item[1] < MAX_LABEL:
            raise DataError(f"{where}: labels[{i}] gives {item[0]!r} the label {item[1]}, outside 0..{MAX_LABEL - 1}")
        if item[0] in table:
            raise DataError(f"{where}: labels[{i}] labels {item[0]!r} a second time")
        table[item[0]] = item[1]
    return table


def dataset_json_label_array(table: dict[str, int] | None, keys: list[str], where: str) -> np.ndarray | None:
    """Labels of ``keys`` from a checked dataset.json's ``table``; None without one or with ``{"labels": null}``."""
    if table is None:
        return None
    missing = [k for k in keys if k not in table]
    if missing:
        raise DataError(f"{where} has no label for {missing[0]!r} ({len(missing)} image(s) unlabelled)")
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
