"""Checkpoints that are never half-written and never run code when read.

A checkpoint is one safetensors file. Tensors (weights, optimiser moments, RNG states) are stored
as tensors; everything else (epoch, scheduler counters, Python/NumPy RNG, the resolved config, the
library version) is JSON in the safetensors metadata. A SHA-256 of the whole content is stored too and
checked on load, so a corrupted or tampered file is refused. Files are written to a temporary name,
flushed to disk and renamed over the old one: a crash leaves either the old or the new file.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "cass-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file cannot be written or trusted; the message names the file."""


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


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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
        raise CheckpointError(f"could not write {path} ({reason}); the previous file, if any, is intact") from err
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
    _atomic_write(path, lambda tmp: tmp.write_text(text))


# --- nested state <-> (JSON, flat tensors) --------------------------------------------------------


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Split a nested state into JSON-able data and a flat dict of tensors (referenced by name)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy arrays and scalars
        import numpy as np

        array = np.asarray(obj)
        tensors[prefix] = torch.from_numpy(array.copy())
        return {"__ndarray__": prefix}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def unflatten(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__ndarray__" in data:
            return tensors[data["__ndarray__"]].numpy()
        if "__tuple__" in data:
            return tuple(unflatten(v, tensors) for v in data["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in data["__dict__"]}
    if isinstance(data, list):
        return [unflatten(v, tensors) for v in data]
    return data


def _content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(metadata):
        digest.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any], info: dict[str, str] | None = None) -> None:
    """Atomically write ``state`` (any nesting of dicts, lists, tensors and scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(state, tensors, "s")
    metadata = {"format": FORMAT, "state": json.dumps(structure), **(info or {})}
    metadata["sha256"] = _content_hash(tensors, metadata)
    _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_info(path: str | Path) -> dict[str, str]:
    """The metadata of a checkpoint (config, version, ...) without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read and verify a checkpoint; returns (state, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cass checkpoint (format {metadata.get('format')!r})")
    expected = metadata.pop("sha256", None)
    if expected != _content_hash(tensors, metadata):
        raise CheckpointError(f"{path}: content hash mismatch: the file is corrupted or was modified")
    metadata["sha256"] = expected
    return unflatten(json.loads(metadata["state"]), tensors), metadata


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], info: dict[str, str] | None = None) -> None:
    """Atomically write plain weights (a timm state dict) that any safetensors reader can load.

    The metadata carry a SHA-256 of the content, checked by :func:`verify_weights` when present.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = dict(info or {})
    metadata["sha256"] = _content_hash(tensors, metadata)
    _atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def verify_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse a cass weights file whose content no longer matches its stored hash.

    Files written by other tools carry no ``sha256`` and are accepted as they are.
    """
    expected = metadata.get("sha256")
    if expected is None:
        return
    rest = {k: v for k, v in metadata.items() if k != "sha256"}
    if expected != _content_hash(tensors, rest):
        raise CheckpointError(f"{path}: content hash mismatch: the file is corrupted or was modified")
