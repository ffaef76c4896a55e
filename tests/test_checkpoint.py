"""Checkpoints: exact round trip, verified hash, atomic writes, no code execution on load."""

from __future__ import annotations

import os
import pickle
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from cass.models.weights import load_state_dict_file
from cass.utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)


def optimiser_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def test_round_trip_of_training_state(tmp_path):
    state = {
        **optimiser_state(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "train": {"epoch": 3, "step": 41},
        "none": None,
    }
    save_checkpoint(tmp_path / "c.safetensors", state, {"config": "epochs: 3\n"})
    loaded, info = load_checkpoint(tmp_path / "c.safetensors")
    assert info["config"] == "epochs: 3\n" and len(info["sha256"]) == 64
    assert loaded["train"] == {"epoch": 3, "step": 41} and loaded["none"] is None
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert set(loaded["opt"]["state"]) == {0, 1}  # integer keys survive
    assert loaded["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate((loaded["rng"]["python"][0], tuple(loaded["rng"]["python"][1]), loaded["rng"]["python"][2]))
    a = (np.random.rand(), random.random())
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    assert a == (np.random.rand(), random.random())


def test_tampered_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(64)})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.zeros(3)})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cass.utils.checkpoint.save_file", disk_full)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(3)})
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"], "temporary file left behind"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/cass_pickle_bomb",))


def test_pickle_bomb_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"w": _RunsCode()}}, fh)
    if os.path.exists("/tmp/cass_pickle_bomb"):
        os.remove("/tmp/cass_pickle_bomb")
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict_file(path)
    assert not os.path.exists("/tmp/cass_pickle_bomb")


def test_plain_weights_load_from_safetensors_and_state_dicts(tmp_path):
    sd = torch.nn.Linear(2, 2).state_dict()
    save_weights(tmp_path / "w.safetensors", sd)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = load_state_dict_file(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_tampered_weights_file_is_refused_but_foreign_files_load(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cnn.safetensors"
    save_weights(path, {"w": torch.arange(64, dtype=torch.float32)}, {"role": "cnn"})
    assert torch.equal(load_state_dict_file(path)["w"], torch.arange(64, dtype=torch.float32))
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="hash mismatch"):
        load_state_dict_file(path)
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))  # no hash: another tool's file
    assert torch.equal(load_state_dict_file(tmp_path / "foreign.safetensors")["w"], torch.ones(2))


def test_a_dead_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    leftover = tmp_path / f".weights.safetensors.{host}.{int(dead.stdout)}.abc123.tmp"
    in_progress = tmp_path / f".weights.safetensors.{host}.{os.getppid()}.def456.tmp"
    other_file = tmp_path / f".other.safetensors.{host}.{int(dead.stdout)}.ghi789.tmp"
    for path in (leftover, in_progress, other_file):
        path.write_bytes(b"partial")
    save_weights(tmp_path / "weights.safetensors", {"w": torch.ones(2)})
    assert not leftover.exists()
    assert in_progress.exists() and other_file.exists()


def test_written_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    save_weights(tmp_path / "weights.safetensors", {"w": torch.ones(2)})
    assert (tmp_path / "weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 under umask 022
