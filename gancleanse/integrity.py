"""Content hashes that let a run directory prove it is what training wrote.

Training records the sha256 of every file it writes in ``run.json`` (``"files"``) and seals ``run.json``
itself: ``"seal"`` is the sha256 of its canonical JSON without the seal. Readers hash each file as they read
it (the bytes they hash are the bytes they parse, so nothing can change in between) and refuse a mismatch with
one line that names the file. The seal doubles as the run's identity: resumable parts (retrains of a
validation or a study) record the seal of the run they came from and are never reused for another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from .errors import RunDirError


def sha256_file(path: str | Path) -> str:
    """Streamed sha256 of a file (constant memory for any size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_verified(root: Path, name: str, expected: str | None) -> bytes:
    """The bytes of ``root/name``, refused unless their sha256 is ``expected`` (from run.json)."""
    if expected is None:
        raise RunDirError(f"{name}: run.json of {root} records no hash for it")
    try:
        with open(root / name, "rb") as f:
            data = f.read()
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
