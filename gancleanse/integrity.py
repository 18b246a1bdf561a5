"""Content hashes that let a run directory prove it is what training wrote.

Training records the sha256 of every file it writes in ``run.json`` (``"files"``) and seals ``run.json``
itself: ``"seal"`` is the sha256 of its canonical JSON without the seal. Readers hash each file as they read
it (the bytes they hash are the bytes they parse, so nothing can change in between) and refuse a mismatch with
one line that names the file. The seal doubles as the run's identity: resumable parts (retrains of a
validation or a study) record the seal of the run they came from and are never reused for another.

Bounds: every reader of a run or study directory goes through ``read_bounded``. It opens regular files only (a FIFO
would block a reader forever, ``/dev/zero`` never ends; a symlink is followed, and what it names must pass the same
checks) and reads at most a bound: the size run.json records for the file (``"sizes"``, written since sizes were
recorded), else a cap per file kind (``RUN_JSON_MAX_BYTES``, ``UNRECORDED_MAX_BYTES``), and never more than the memory
available. A file over its bound, or one that grows while read, is refused by name, so no crafted directory can hang a
reader or exhaust its memory. ``check_fits`` is the same rule for the arrays a size key of the config allocates.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import IO, Any, Iterable

import torch

from .errors import ConfigError, RunDirError
from .memory import available_bytes

MiB = 2**20
RUN_JSON_MAX_BYTES = 64 * MiB  # run.json records no size of its own: sizes, hashes and steps fit far below this
# Files whose size run.json does not record (runs trained before it recorded sizes): the text parsed whole gets a
# cap of its own; tensor files and the loss log are bounded by the memory available alone.
UNRECORDED_MAX_BYTES = {"config.toml": 16 * MiB, "splits.json": 1024 * MiB}
NOT_REGULAR = "not a regular file: a FIFO, device or directory could block a reader or never end"


class UnboundedFile(OSError):
    """A file that ``read_bounded`` refuses to read: not a regular file, or larger than its bound."""


def sha256_file(path: str | Path) -> str:
    """Streamed sha256 of a regular file (constant memory for any size; a FIFO or device is refused, not waited on)."""
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_regular(path: str | Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (after symlinks): a FIFO or device is an
    ``UnboundedFile`` error, never a read that blocks forever or never ends; a dangling symlink is FileNotFoundError."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # checked before opening: opening a device can act
        raise UnboundedFile(NOT_REGULAR)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO swapped in since cannot block the open
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnboundedFile(NOT_REGULAR)
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, limit: int | None, bound: str = "its cap") -> bytes:
    """The bytes of the regular file ``path``: at most ``limit`` (named ``bound`` in errors) and never more than the
    memory available, or an ``UnboundedFile`` error saying why not."""
    with open_regular(path) as f:
        info = os.fstat(f.fileno())
        free = available_bytes(torch.device("cpu"))
        if free is not None and (limit is None or free < limit):
            limit, bound = free, "the memory available"
        if limit is not None and info.st_size > limit:
            raise UnboundedFile(f"{info.st_size} bytes, more than {bound} ({limit} bytes)")
        data = f.read(info.st_size + 1)  # never more: a file that grows while read (or /proc's) is refused
    if len(data) > info.st_size:
        raise UnboundedFile(f"it grew past its {info.st_size} bytes while it was read")
    return data


def read_verified(root: Path, name: str, expected: str | None, size: int | None = None) -> bytes:
    """The bytes of ``root/name``, refused unless their sha256 is ``expected`` (from run.json); at most ``size``
    bytes when run.json records it, else the file kind's cap."""
    if expected is None:
        raise RunDirError(f"{name}: run.json of {root} records no hash for it")
    limit, bound = ((size, "the size run.json records") if size is not None else
                    (UNRECORDED_MAX_BYTES.get(name), f"the cap on {name}"))
    try:
        data = read_bounded(root / name, limit, bound)
    except FileNotFoundError:
        raise RunDirError(f"{name} is missing from the run directory {root}") from None
    except OSError as e:
        raise RunDirError(f"{name} in {root}: cannot read it ({e.strerror or e})") from None
    if (digest := hashlib.sha256(data).hexdigest()) != expected:
        raise RunDirError(f"{name} in {root} was changed after training (sha256 {digest[:12]}..., "
                          f"run.json records {expected[:12]}...)")
    return data


def seal_of(meta: dict[str, Any]) -> str:
    """sha256 of ``meta`` without its ``seal``, as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps({k: v for k, v in meta.items() if k != "seal"}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "seal": seal_of(meta)}


def file_hashes(root: Path, names: Iterable[str]) -> dict[str, str]:
    """{relative name: sha256} of the named files under ``root``."""
    return {name: sha256_file(root / name) for name in names}


def file_sizes(root: Path, names: Iterable[str]) -> dict[str, int]:
    """{relative name: bytes} of the named files under ``root``: the most a reader will read of each."""
    return {name: (root / name).stat().st_size for name in names}


def check_fits(key: str, value: int, nbytes: int, what: str, device: torch.device = torch.device("cpu")) -> None:
    """Refuse, before allocating, ``nbytes`` for ``what`` that the memory available on ``device`` cannot hold, naming
    the config ``key`` that asks for them (a size that fits the machine but not its free memory would fill it)."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise ConfigError(f"{key} = {value}: {what} would need {nbytes} bytes of memory ({nbytes / 1e9:.3g} GB), "
                          f"only {free} bytes ({free / 1e9:.3g} GB) are available on {device.type}")
