"""Writing files so that no reader ever sees half of one, and no failure leaves a stray file.

``atomic_write`` is the one way gancleanse writes an output file: a temporary file with a unique name beside the target,
created exclusively (never a user's file of the same name), renamed over the target only when the block finishes, and
removed on any failure (a full disk included). ``staged_directory`` does the same for a whole directory.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import secrets
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from .errors import GancleanseError, RunDirError
from .locks import DirectoryLock

STAGE_MARKER = ".gancleanse-stage"  # inside OUT.partial: the stage is ours to remove
TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # atomic_write's temporaries: .NAME.<random>.tmp


@contextmanager
def atomic_write(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Yield a file to write ``path``'s new content into; readers see the old file or the new one."""
    path = Path(path)
    while True:  # a new file .NAME.<random>.tmp beside path, created with O_EXCL (mode 0666 less the umask)
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"))
        with suppress(FileExistsError):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: say which file could not be written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON (no NaN or infinity: they are not JSON), indented, through ``atomic_write``."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV table: floats written with ``repr`` (shortest round-trip form), the rest as ``str``."""
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(header)
        w.writerows([repr(float(v)) if isinstance(v, float) else v for v in row] for row in rows)


@contextmanager
def claimed_output(path: str | Path, suffix: str, force: bool, option: str = "--out") -> Iterator[Path]:
    """An output file (and its ``.json`` beside it) claimed for a whole command, checked before any work starts.

    A lock beside it (``.NAME.lock``) refuses a second writer, naming the holder, until the command ends: two
    commands given the same output cannot both compute and the later silently replace the other's result. Under the
    lock the path must end in ``suffix``, must not be a directory, and may exist only with ``force``.
    """
    out = Path(path)
    if out.suffix.lower() != suffix:
        raise GancleanseError(f"{option} {path}: must end in {suffix}")
    with DirectoryLock(out.parent, "output", lock_name=f".{out.name}.lock", subject=f"{option} {path}"):
        for p in (out, out.with_suffix(".json")):
            if p.is_dir():
                raise GancleanseError(f"{option} {path}: {p} is a directory")
            if (p.exists() or p.is_symlink()) and not force:
                raise GancleanseError(f"{option} {path}: {p} exists (use --force to replace it)")
        yield out


def remove_temporaries(directory: Path) -> None:
    """The temporaries of ``atomic_write`` that a killed writer left in ``directory`` (a stage kept to resume), never
    part of its output; its subdirectories are not searched."""
    for path in directory.iterdir():
        if TEMPORARY_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()


@contextmanager
def staged_directory(out: Path, force: bool = False, *, is_ours: Callable[[Path], bool],
                     what: str = "run", resume: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a staging directory ``OUT.partial`` that becomes ``out`` only if the block finishes.

    A lock beside ``out`` (``.OUT.lock``, held through the final rename) keeps a second writer out; a stage left by a
    writer that died is removed only if it carries our marker. ``force`` replaces an existing ``out`` only when
    ``is_ours(out)`` (a directory gancleanse wrote): never a user's file or directory. On any error the stage is
    removed, so nothing half-written remains.

    ``resume`` makes the stage resumable (long work that an interruption should not throw away): a dead writer's stage
    is offered to it (unless ``force``), True keeps it for the block to continue, False removes it, and an error it
    raises refuses the stage and leaves it as it is; an interrupted block (Ctrl-C, SIGTERM) keeps its stage too.
    """
    out = Path(out)
    stage = out.with_name(out.name + ".partial")
    with DirectoryLock(out.parent, what, lock_name=f".{out.name}.lock"):
        if out.exists() or out.is_symlink():
            if not out.is_dir() or out.is_symlink():
                raise RunDirError(f"{out} exists and is not a directory; choose another output path")
            if not force:
                raise RunDirError(f"output directory already exists: {out} (use --force to replace it)")
            if not is_ours(out):
                raise RunDirError(f"{out} exists and is not a gancleanse {what} directory: --force replaces "
                                  "only those; choose another output path")
        if stage.exists() or stage.is_symlink():
            if stage.is_symlink() or not stage.is_dir() or not (stage / STAGE_MARKER).is_file():
                raise RunDirError(f"{stage} exists and was not left by gancleanse; remove or rename it")
            if force or resume is None or not resume(stage):
                shutil.rmtree(stage)  # a writer that died left it (a live one would hold the lock)
            else:
                remove_temporaries(stage)
        stage.mkdir(parents=True, exist_ok=stage.is_dir())
        (stage / STAGE_MARKER).write_text(f"{os.getpid()}\n")
        try:
            yield stage
            (stage / STAGE_MARKER).unlink()
            if out.exists():
                shutil.rmtree(out)
            os.replace(stage, out)
        except BaseException as e:
            if resume is None or isinstance(e, Exception):  # an interruption is not the work's failure
                shutil.rmtree(stage, ignore_errors=True)
            raise
