"""One writer per output directory: a lock file that names its holder.

``DirectoryLock(directory, what)`` creates ``directory/.lock`` atomically (``O_CREAT|O_EXCL``)
holding JSON ``{pid, host, started, command, ...}``. A second writer gets a one-line
:class:`~gancleanse.errors.RunDirError` naming the directory and the holding process::

    with DirectoryLock(out, "study"):
        ...  # write into out; nobody else holding a DirectoryLock on out does

A lock left by a process that no longer runs (killed, machine rebooted) is *stale* and taken over silently,
as is an unreadable or garbled lock file. Liveness can be checked only for a holder on this host (and on
POSIX); a lock from another host counts as held until someone deletes the file (the error message says
which). Take-overs are serialized with ``flock`` on the directory: of two processes finding the same stale
lock, exactly one gets it.

The lock is per process and re-entrant: a nested ``DirectoryLock`` on the directory in the process holding it
succeeds (a module-level registry says which locks this process holds; a lock file that merely carries this
process's PID, left by an earlier process with that PID, is stale). Only the outermost release removes the
file, and only while it is still ours; an ``atexit`` hook releases the locks still held at exit.

The directory is created if missing. ``lock_name`` puts the lock file elsewhere, e.g. a sibling lock for a
directory replaced at the end of the job: ``DirectoryLock(out.parent, "run", lock_name=f".{out.name}.lock")``.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

from .errors import RunDirError

LOCK_NAME = ".lock"

# Locks this process holds: lock path -> [pid, token, depth]. The pid guards against a child
# forked while a lock was held: it inherits this dict but does not hold the lock.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.RLock()


class DirectoryLock:
    """Exclusive, re-entrant (per process) write lock on ``directory`` (see the module doc)."""

    def __init__(self, directory: str | os.PathLike, what: str = "run", *, lock_name: str = LOCK_NAME,
                 subject: str | None = None) -> None:
        self.directory = Path(directory)
        self.what = what
        self.subject = subject or f"{what} directory {self.directory}"  # what a refusal names
        self.path = self.directory / lock_name
        self._acquired = False
        self._token: str | None = None

    def acquire(self) -> "DirectoryLock":
        """Take the lock or raise :class:`RunDirError` naming its live holder."""
        if self._acquired:
            raise RuntimeError(f"{self.path} is already acquired by this DirectoryLock object")
        self.directory.mkdir(parents=True, exist_ok=True)
        key = _key(self.path)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                info = _read(self.path) if held[0] == os.getpid() else None
                if info is not None and info.get("token") == held[1]:
                    held[2] += 1  # re-entrant use in this process
                    self._acquired, self._token = True, held[1]
                    return self
                del _HELD[key]  # inherited through fork (the parent's), or our lock file was removed or replaced
            token = secrets.token_hex(16)
            with _guard(self.directory) as guarded:
                self._acquire_file(token, guarded)
            _HELD[key] = [os.getpid(), token, 1]
            self._acquired, self._token = True, token
        return self

    def release(self) -> None:
        """Give the lock up; the file goes only with the outermost release, and only if still ours."""
        if not self._acquired:
            return
        self._acquired = False
        _release_key(_key(self.path), self._token, self.path, self.directory)

    @property
    def held(self) -> bool:
        return self._acquired

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirectoryLock({str(self.directory)!r}, {self.what!r}, held={self._acquired})"

    def _acquire_file(self, token: str, guarded: bool) -> None:
        content = _content(self.what, token)
        for _ in range(100):  # each round either creates the file or sees/removes a lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    with open(fd, "wb", buffering=0) as f:
                        f.write(content)  # one small unbuffered write; readers taking over hold the guard
                except BaseException:  # e.g. disk full: leave no empty lock behind
                    self.path.unlink(missing_ok=True)
                    raise
                return
            raw = _read_raw(self.path)
            if raw is None:
                continue  # vanished meanwhile (released): try again
            info = _parse(raw)
            if info is None and not guarded and _age(self.path) < 2.0:
                # Without the guard an empty file may be a lock being written right now.
                time.sleep(0.05)
                continue
            if info is not None and _alive(info):
                raise RunDirError(_held_message(self.subject, info, self.path))
            # Stale (dead holder, or garbled): remove exactly the file we judged, then retry O_EXCL.
            if _read_raw(self.path) == raw:
                self.path.unlink(missing_ok=True)
        raise RunDirError(f"could not lock {self.directory}: {self.path} keeps changing; "
                          "is another process taking it over in a loop?")


def lock_holder(directory: str | os.PathLike, *, lock_name: str = LOCK_NAME) -> dict[str, Any] | None:
    """The lock file's JSON if a live process holds ``directory`` (or one on another host, which cannot be
    checked), else ``None`` (no, stale or garbled lock): ``pid``, ``host``, ``started`` (ISO time),
    ``command``, ``what``, and ``ours`` (held by this process)."""
    path = Path(directory) / lock_name
    info = _read(path)
    if info is None:
        return None
    with _HELD_GUARD:
        held = _HELD.get(_key(path))
        ours = held is not None and held[0] == os.getpid() and held[1] == info.get("token")
    return {**info, "ours": ours} if ours or _alive(info) else None


# ---------------------------------------------------------------------- helpers
def _key(path: Path) -> str:
    return os.path.join(os.path.realpath(path.parent), path.name)


def _release_key(key: str, token: str | None, path: Path, directory: Path) -> None:
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None or held[0] != os.getpid() or held[1] != token:
            return  # not (or no longer) ours
        held[2] -= 1
        if held[2] > 0:
            return
        del _HELD[key]
        with suppress(OSError), _guard(directory):  # OSError: directory gone or unwritable, nothing of ours left
            info = _read(path)
            if info is not None and info.get("token") == held[1]:
                os.unlink(path)


@atexit.register
def _release_all() -> None:
    with _HELD_GUARD:
        for key, held in list(_HELD.items()):
            if held[0] == os.getpid():
                held[2] = 1
                _release_key(key, held[1], Path(key), Path(key).parent)


@contextmanager
def _guard(directory: Path) -> Iterator[bool]:
    """Serialize lock-file changes in ``directory`` with ``flock`` on it (released by the kernel
    if the process dies). Yields False where ``flock`` is unavailable (no guard)."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without flock
            locked = False
        yield locked
    finally:
        os.close(fd)  # closing drops the flock


def _content(what: str, token: str) -> bytes:
    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "command": " ".join(sys.argv).replace("\n", " "), "what": what, "token": token}
    boot, start = _boot_id(), _process_start(os.getpid())
    if boot is not None and start is not None:  # Linux: tells a reused PID from the holder
        info["boot_id"], info["process_start"] = boot, start
    return (json.dumps(info) + "\n").encode()


def _read_raw(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except FileNotFoundError:
        return None
    except OSError:
        return b""  # unreadable: garbled


def _parse(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    valid = isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str)
    return info if valid else None


def _read(path: Path) -> dict[str, Any] | None:
    return _parse(_read_raw(path))


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(info: dict[str, Any]) -> bool:
    """Whether the holder may still run: always True for another host (cannot be checked)."""
    if info["host"] != socket.gethostname() or os.name != "posix":
        return True  # (on Windows os.kill(pid, 0) would send CTRL_C_EVENT)
    pid = info["pid"]
    if pid <= 0 or pid == os.getpid():
        return False  # invalid, or our PID yet not in the registry (checked by the caller): an earlier process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return True
    boot, start = info.get("boot_id"), info.get("process_start")
    if boot is not None and start is not None:
        if (now_boot := _boot_id()) is not None and now_boot != boot:
            return False  # written before a reboot
        if (now_start := _process_start(pid)) is not None and now_start != start:
            return False  # the PID was reused by another process
    fields = _stat_fields(pid)
    return not (fields and fields[0] in ("Z", "X"))  # a zombie has exited


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...


def _process_start(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22: starttime


def _held_message(subject: str, info: dict[str, Any], path: Path) -> str:
    command = " ".join(str(info.get("command", "")).split())  # one line
    if len(command) > 120:
        command = command[:117] + "..."
    by = f"process {info['pid']}" + (f" ({command})" if command else "")
    hint = "wait for it or stop it"
    if info["host"] != socket.gethostname() or os.name != "posix":  # liveness not checked
        hint += f"; if it no longer runs, delete {path}"
    return (f"{subject} is being written by {by} on {info['host']} "
            f"since {info.get('started', '?')}; {hint}")
