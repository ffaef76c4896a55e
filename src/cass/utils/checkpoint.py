"""Checkpoints that are never half-written and never run code when read.

A checkpoint is one safetensors file. Tensors (weights, optimiser moments, RNG states) are stored
as tensors; everything else (epoch, scheduler counters, Python/NumPy RNG, the resolved config, the
library version) is JSON in the safetensors metadata. A SHA-256 of the whole content is stored too and
checked on load, so a corrupted or tampered file is refused. Files are written to a temporary name,
flushed to disk and renamed over the old one: a crash leaves either the old or the new file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cass.utils.atomic import WriteError, atomic_write

FORMAT = "cass-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file cannot be written or trusted; the message names the file."""


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


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except WriteError as err:
        raise CheckpointError(str(err)) from err


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
    _write_safetensors(Path(path), tensors, metadata)


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
    _write_safetensors(Path(path), tensors, metadata)


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
