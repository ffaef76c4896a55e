"""Reading weight files safely: safetensors, or a state dict through ``torch.load(weights_only=True)``.

No pickle that could run code is ever executed: ``weights_only=True`` refuses anything but tensors
and plain containers, and the refusal is turned into an error naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cass.utils.checkpoint import CheckpointError, verify_weights

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, unwrapped from common containers and ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                state = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
        verify_weights(path, state, metadata)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
            raise CheckpointError(
                f"{path}: refused to load: not a plain tensor state dict ({type(err).__name__}: {err}). "
                "cass never unpickles arbitrary objects; convert the file to safetensors"
            ) from err
    for key in _CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: does not hold a dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
