"""Is the data still what the run was trained on? ``export`` asks before it writes anything.

``train`` records in the run's ``splits.json`` (the ``source`` of the splits) the aggregate digest the fingerprint
uses and, beside it, a short sha256 per key: every file of a folder and member of a zip (``sha256``: {key: hash},
``dataset.json`` included), every row of an array file (``rows``: one hash per row, concatenated, over the row of
``x`` and of ``y``). ``verify_source`` rehashes the source and refuses a changed one with one line naming the first
changed key. Only bytes are hashed (nothing is decoded), streamed in constant memory. A run recorded before the
per-key hashes has the aggregate digest alone: a change is then refused without naming a key.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from ..errors import DataError
from ..integrity import open_regular
from .image_listing import DATASET_JSON, READ_ERRORS, list_folder, list_zip
from .images import npy_header

KEY_HASH_CHARS = 16  # hex characters kept per key: enough to name a change (the aggregate is a full sha256)


class SourceDigest:
    """A folder's or zip's aggregate digest (what the fingerprint covers) and each key's short sha256, fed one file
    at a time in key order. A file that cannot be read (skipped with ``skip_bad_files``) has no bytes."""

    def __init__(self, dataset_json: bytes | None) -> None:
        self.total = hashlib.sha256()
        self.keys: dict[str, str] = {}
        if dataset_json is not None:
            self.add(DATASET_JSON, hashlib.sha256(dataset_json).digest())

    def add(self, key: str, file_sha256: bytes | None) -> None:
        self.total.update(key.encode() + b"\0" + (file_sha256 or b""))
        self.keys[key] = "" if file_sha256 is None else file_sha256.hex()[:KEY_HASH_CHARS]

    def hexdigest(self) -> str:
        return self.total.hexdigest()


def row_hashes(x: np.ndarray, y: np.ndarray | None) -> str:
    """The short sha256 of every row's stored bytes (``x[i]``, then ``y[i]`` when ``y`` has a row per image)."""
    arrays = [x] + ([y] if y is not None and y.ndim and y.shape[0] == x.shape[0] else [])
    return "".join(hashlib.sha256(b"".join(a[i:i + 1].tobytes() for a in arrays)).hexdigest()[:KEY_HASH_CHARS]
                   for i in range(x.shape[0]))


# ------------------------------------------------------------------------------ checking
def verify_source(source: dict[str, Any], run: Path) -> None:
    """Refuse a source whose bytes differ from what ``run`` was trained on (DataError, one line)."""
    path, kind = Path(source["path"]), source["format"]
    if kind in ("folder", "zip"):
        listing = list_folder(path) if kind == "folder" else list_zip(path)
        try:
            sums = SourceDigest(listing.dataset_json)
            for key in listing.keys:
                sums.add(key, _streamed_sha256(listing.open, key))
        finally:
            listing.close()
        total, keys = sums.hexdigest(), sums.keys
    else:
        whole = _streamed_sha256(lambda _: open_regular(path), str(path))
        total, keys = ("" if whole is None else whole.hex()), None
    if "reference" in source:  # the recorded digest covers both sources; the reference's own one is recorded
        total = hashlib.sha256((total + source["reference"]["digest"]).encode()).hexdigest()
    if total == source.get("file_sha256", source.get("digest")):
        return
    if keys is not None:  # name the first changed file or member, where the run recorded one hash per key
        changed = _first_changed_key(source.get("sha256"), keys)
        where = None if changed is None else str(path / changed[0]) if kind == "folder" else f"{path}:{changed[0]}"
    else:  # an array file: the first changed row
        changed = None if not isinstance(source.get("rows"), str) else _first_changed_row(
            source["rows"], _row_hashes_of_file(path, source.get("array")))
        where = None if changed is None else f"{path} row {changed[0]}"
    fix = "export copies only the data the run was trained on (restore it, or train again)"
    if changed is None:
        raise DataError(f"the data at {path} changed since {run} was trained (its sha256 differs from the one "
                        f"recorded); {fix}")
    raise DataError(f"the data changed since {run} was trained: {where} {changed[1]}; {fix}")


def _streamed_sha256(open_file: Any, key: str) -> bytes | None:
    """sha256 of one file or member read as a stream; None when it cannot be read."""
    try:
        with open_file(key) as f:
            return hashlib.file_digest(f, "sha256").digest()
    except READ_ERRORS:
        return None


def _first_changed_key(recorded: dict[str, str] | None, current: dict[str, str]) -> tuple[str, str] | None:
    """(key, what happened) of the first key, in sorted order, whose hash differs; None without a record."""
    if not isinstance(recorded, dict):
        return None
    for key in sorted(recorded.keys() | current.keys()):
        old, new = recorded.get(key), current.get(key)
        if old != new:
            return key, ("was added" if old is None else "was removed" if new is None
                         else "cannot be read now" if new == "" else "has other bytes")
    return None


def _first_changed_row(recorded: str, current: str) -> tuple[str, str] | None:
    """('#i', what happened) of the first row whose hash differs."""
    width = KEY_HASH_CHARS
    for i in range(max(len(recorded), len(current)) // width):
        old, new = recorded[i * width:(i + 1) * width], current[i * width:(i + 1) * width]
        if old != new:
            return f"#{i}", "was added" if not old else "was removed" if not new else "has other values"
    return None


def _row_hashes_of_file(path: Path, array: str | None) -> str:
    """``row_hashes`` of the file as it is now, reading one row at a time."""
    try:
        if path.suffix.lower() == ".npy":
            with open_regular(path) as f:
                return "".join(_hash_rows([_rows(f, lambda: open_regular(path))]))
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if f"{array or 'x'}.npy" not in names:
                raise DataError(f"{path}: the array {array or 'x'!r} the run was trained on is gone")
            streams = [archive.open(f"{name}.npy") for name in (array or "x", "y") if f"{name}.npy" in names]
            try:
                return "".join(_hash_rows([_rows(s, lambda n=s.name: archive.open(n)) for s in streams]))
            finally:
                for s in streams:
                    s.close()
    except (*READ_ERRORS, ValueError) as e:
        raise DataError(f"{path}: cannot be read as it was at training ({e})") from None


def _rows(f: IO[bytes], reopen: Any) -> tuple[int, Iterator[bytes]]:
    """(row count, each row's stored bytes) of the .npy stream ``f``; a Fortran-ordered array is read whole."""
    shape, fortran, dtype = npy_header(f)
    if not shape:
        return 0, iter(())
    if fortran or dtype.hasobject:
        with reopen() as again:
            whole = np.lib.format.read_array(again, allow_pickle=False)
        return shape[0], (whole[i:i + 1].tobytes() for i in range(shape[0]))
    size = dtype.itemsize * math.prod(shape[1:])
    return shape[0], (f.read(size) for _ in range(shape[0]))


def _hash_rows(arrays: list[tuple[int, Iterator[bytes]]]) -> Iterator[str]:
    """``row_hashes`` over streamed rows: ``y`` joins only when it has a row per image, as at training."""
    n = arrays[0][0]
    aligned = [rows for count, rows in arrays if count == n]
    for _ in range(n):
        yield hashlib.sha256(b"".join(next(rows) for rows in aligned)).hexdigest()[:KEY_HASH_CHARS]
