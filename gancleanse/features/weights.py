"""The one download gancleanse makes, and only when asked: ``gancleanse weights inception``.

The Inception-v3 weights of the FID standard are a published PyTorch state dict, released by pytorch-fid as
``pt_inception-2015-12-05-6726825d.pth`` and by torch-fidelity as ``weights-inception-2015-12-05-6726825d.pth``:
the same 95,628,359 bytes under two names. Its full sha256 (``PUBLISHED_SHA256``) is the one projects that pin this
file record for both names; it begins with the 8 hex digits the names carry (torch.hub's convention). Nothing else
in gancleanse downloads: metrics look for the file on disk (``gancleanse.features.inception.find_weights``) and say
where to put it when it is missing.

``download_inception`` streams the file to a temporary file beside the destination while hashing it and renames it
into place only when the hash matches, so a reader never sees a partial or wrong file under the published name.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import torch

from ..errors import ConfigError, GancleanseError
from ..files import atomic_write
from ..integrity import sha256_file

PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_NAME = "weights-inception-2015-12-05-6726825d.pth"
PUBLISHED_NAMES = (PYTORCH_FID_NAME, TORCH_FIDELITY_NAME)  # the order in which the cache is searched
PUBLISHED_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_NAME}"
PUBLISHED_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PUBLISHED_BYTES = 95_628_359
CHUNK_BYTES = 2**20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def checkpoints_dir() -> Path:
    """torch.hub's checkpoint cache (``$TORCH_HOME/hub/checkpoints``), where pytorch-fid and torch-fidelity keep
    the file: a copy either of them downloaded is found without a second download."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def default_destination() -> Path:
    return checkpoints_dir() / PYTORCH_FID_NAME


def _first_line(text: object) -> str:
    return (str(text).strip().splitlines() or [""])[0][:200]


def _failure(url: str, error: BaseException) -> GancleanseError:
    """The one-line error of a download that could not complete."""
    if isinstance(error, urllib.error.HTTPError):
        reason = f"HTTP {error.code} {_first_line(error.reason)}"
    elif isinstance(error, urllib.error.URLError):
        reason = _first_line(error.reason)
    else:
        reason = f"{type(error).__name__}: {_first_line(error)}"
    return GancleanseError(f"could not download {url}: {reason or 'no reason given'}")


def _stream(url: str, timeout: float, out: IO[bytes]) -> tuple[str, int]:
    """Copy ``url`` into ``out``; returns the sha256 and the size of what was copied."""
    digest, size = hashlib.sha256(), 0
    try:
        response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the URL is the caller's choice
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        raise _failure(url, e) from None
    with response:
        while True:
            try:
                chunk = response.read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as e:
                raise _failure(url, e) from None
            if not chunk:
                return digest.hexdigest(), size
            digest.update(chunk)
            out.write(chunk)  # a full disk is an OSError naming the destination (atomic_write)
            size += len(chunk)


def download_inception(to: Path | None = None, *, url: str = PUBLISHED_URL, sha256: str = PUBLISHED_SHA256,
                       timeout: float = 60) -> Path:
    """Fetch the Inception-v3 weights to ``to`` (default: torch.hub's checkpoint cache under the pytorch-fid name;
    an existing directory: the file goes inside it under that name) and return the path.

    A destination that already has the content ``sha256`` is returned as it is, nothing downloaded. Otherwise the
    file is streamed to a unique temporary file in the destination's directory while hashed; a hash that differs
    from ``sha256`` removes it and raises (nothing is written); a matching one is renamed over the destination
    atomically. An unreachable URL, an HTTP error or a timeout (``timeout`` seconds per network operation) raises a
    one-line ``GancleanseError`` naming the URL and the reason."""
    expected = sha256.lower()
    if not _SHA256.fullmatch(expected):
        raise ConfigError(f"expected sha256 must be 64 hex digits, got {sha256!r}")
    destination = default_destination() if to is None else Path(to).expanduser()
    if destination.is_dir():
        destination = destination / PYTORCH_FID_NAME
    if destination.is_file() and sha256_file(destination) == expected:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(destination, binary=True) as out:
        found, size = _stream(url, timeout, out)
        if found != expected:  # raised inside the block: the temporary file is removed, the destination untouched
            raise GancleanseError(f"download of {url} has sha256 {found} ({size} bytes), expected {expected}: "
                                  f"not written to {destination}")
    return destination
