"""Atomic file writes: the one way every file of a run is written.

The ground floor of the package (it imports nothing from ``cass``). A file is written to a temporary
name beside it, flushed to disk and renamed over the old one, so a crash or a full disk leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import glob
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path


class WriteError(RuntimeError):
    """A file could not be written; the message names it and says the previous version is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""What ``open()`` would give a new file; ``mkstemp`` alone makes it private (0600)."""


def _temporary_prefix(path: Path, pid: int) -> str:
    """``.<name>.<host>.<pid>.``: who wrote a temporary file, so a dead writer's leftovers can be removed."""
    return f".{path.name}.{socket.gethostname()}.{pid}."


def _remove_dead_writers_files(path: Path) -> None:
    """Delete temporary files that a killed process on this host left while writing ``path``.

    Only files of processes that no longer exist are removed: another live writer's file (a second
    run, or a DDP rank on a shared disk) is never touched.
    """
    host_prefix = f".{path.name}.{socket.gethostname()}."
    for tmp in path.parent.glob(f"{glob.escape(host_prefix)}*.tmp"):
        pid = tmp.name[len(host_prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` through ``write(tmp)`` on a temporary file in the same folder, fsync and rename.

    A crash leaves either the old file or the new one, never half of one; the temporary name records
    the host and PID so that a later write removes what a dead writer left.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path, os.getpid()), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # after writing: safetensors replaces the file it is given
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = "disk full" if err.errno == errno.ENOSPC else str(err)
        raise WriteError(f"could not write {path} ({reason}); the previous file, if any, is intact") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text))




def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a binary file through a temporary file and a rename."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
