"""Files a run writes: whole or not at all, one run per folder, and the system's refusals in one line.

Every writer here goes through a temporary sibling and a rename, so a reader (or a run killed
mid-write) never leaves half a file under the real name, and a failed write leaves no temporary.
"""

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from cifar_accel.errors import UserError

LOCK_NAME = ".lock"


TEMPORARY_SUFFIX = ".tmp"


def _host_tag() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename to ``path``; the temporary is removed if anything fails.

    The temporary is named after the writer (host and pid), so that one left by a killed writer can be
    recognised and removed (``remove_abandoned_temporaries``).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{_host_tag()}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except Exception as error:
        raise as_os_error(error, path) from error
    finally:
        temporary.unlink(missing_ok=True)


def as_os_error(error: Exception, path: str | Path) -> Exception:
    """The ``OSError`` behind a failed write by safetensors or ``torch.save``, which report a full
    disk in their own words ("os error 28", "unexpected pos"); other errors are returned as they are."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"os error (\d+)", str(error))
    if code:
        return OSError(int(code[1]), os.strerror(int(code[1])), str(path))
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    usage = os.statvfs(folder)
    if usage.f_bavail * usage.f_frsize < 2**20:  # the write failed with less than 1 MiB left: the disk is full
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return error


def remove_abandoned_temporaries(folder: Path) -> None:
    """Remove the temporaries of writers on this machine that no longer run: a writer killed by SIGKILL
    (or the machine's power) cannot remove its own, and a decoded-image cache's is the size of the data."""
    for temporary in folder.glob(f".*{TEMPORARY_SUFFIX}"):
        parts = temporary.name.rsplit(".", 3)  # "", NAME, HOST, PID, "tmp" with the name's own dots in NAME
        if len(parts) != 4:
            continue
        host, pid = parts[1], parts[2]
        if host == _host_tag() and pid.isascii() and pid.isdigit() and not _process_exists(int(pid)):
            temporary.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def write_json(path: str | Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def describe_os_error(error: OSError) -> str:
    """``PATH: reason`` for what the operating system refused (disk full, permission, read-only...)."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else reason


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """Refuse, without creating anything, a folder that cannot be created or written."""
    if not str(folder).strip():
        raise UserError(f"{flag} must name a folder, got an empty string")
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UserError(f"{flag} {folder}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise UserError(f"{flag} {folder} {what}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise UserError(f"{flag} {folder} {problem}{' (read-only file system)' if read_only else ''}")


_HELD: set[str] = set()  # lock files this process holds: POSIX locks never conflict within one process


class FolderLock:
    """An exclusive lock on a run folder, so that two runs never write the same files.

    A POSIX record lock (``lockf``): the kernel releases it when the holder dies, so a killed run
    never leaves a stale lock, and unlike ``flock`` it is not shared with forked DataLoader workers,
    which may outlive a killed run by seconds. The lock file only says who holds it, for the refusal.
    """

    def __init__(self, folder: str | Path, flag: str = "--output_dir"):
        self.folder, self.flag = Path(folder), flag
        self._file = None

    def refuse_if_held(self) -> None:
        """Refuse now, writing nothing, if a live run holds the folder."""
        try:
            handle = open(self.folder / LOCK_NAME)
        except OSError:  # no lock file: no run has held this folder
            return
        with handle:
            self._take(handle, fcntl.LOCK_SH)
            fcntl.lockf(handle, fcntl.LOCK_UN)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.folder / LOCK_NAME, "a+")
        self._take(handle, fcntl.LOCK_EX)
        _HELD.add(os.path.realpath(handle.name))
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._file = handle

    def _take(self, handle, kind: int) -> None:
        try:
            if os.path.realpath(handle.name) in _HELD:
                raise BlockingIOError(errno.EAGAIN, "held by this process")
            fcntl.lockf(handle, kind | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"{self.flag} {self.folder} is in use by another run ({holder}); wait for it to end, "
                f"or choose another {self.flag}"
            ) from None

    def release(self) -> None:
        if self._file is not None:
            _HELD.discard(os.path.realpath(self._file.name))
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def remove_tree(path: Path) -> None:
    """Remove a folder if present; a half-removed one is never left in the way of a retry."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
