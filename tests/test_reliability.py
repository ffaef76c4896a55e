"""Whole runs under crashes, faults and hostile inputs, and their repeatability (issue 7).

The crash tests run the real ``cass pretrain`` command in separate processes and SIGKILL them at
random points: at a random optimiser step, at a random time (start-up, data, a step or a save),
in the middle of writing a checkpoint or weights file, and right after renaming one into place.
Each kill is followed by ``--resume`` (or, when the run died before saving its config, by the same
command again), and the final weights must equal, bit for bit, those of a run that was never interrupted.

Starting Python with torch, timm and Lightning costs seconds, so the runs are forked from one
process that paid those imports (:func:`serve`); every run is still its own process, killed by a
real SIGKILL. Faults are injected from outside production code, by wrapping library functions in
the forked child (:func:`arm`). All runs use one thread: equal bits need the same reduction order.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, TINY_VIT
from safetensors.torch import load_file
from typer.testing import CliRunner

from cass.cli.main import app
from cass.config import DataConfig, FinetuneConfig, PretrainConfig, save_yaml
from cass.data import DataError, load_splits
from cass.utils.checkpoint import load_checkpoint

TESTS = Path(__file__).resolve().parent
EPOCHS = 2
CHECKPOINT = "checkpoint.safetensors"
WEIGHT_FILES = ("cnn.safetensors", "vit.safetensors")
OPTIMIZER_STEPS_PER_ITERATION = 2
"""CASS steps one Adam per network (``cass.separate_optimizers``, the default)."""
RUN_LIMIT_S = 300
"""A run (or a resume) taking longer than this is hung: it is killed and the test fails."""


def pretrain_args(data: Path, out: Path) -> list[str]:
    return ["pretrain", "--data", str(data), "--cnn", TINY_CNN, "--vit", TINY_VIT, "--img-size", "32",
            "--batch-size", "16", "--epochs", str(EPOCHS), "--num-workers", "0", "--accelerator", "cpu",
            "--seed", "3", "--out", str(out)]


def run_env(cache: Path, hash_seed: int = 0) -> dict[str, str]:
    """One thread (for equal bits), a private image cache, a chosen string-hash seed, logs that survive a kill."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CASS_CACHE_DIR": str(cache), "PYTHONHASHSEED": str(hash_seed),
            "PYTHONUNBUFFERED": "1"}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in WEIGHT_FILES for k, v in load_file(run_dir / name).items()}


def assert_same_weights(expected: Path, got: Path) -> None:
    a, b = weights(expected), weights(got)
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def metrics(run_dir: Path, column: str) -> list[str]:
    """One column of the run's metrics.csv, as written (floats in full precision)."""
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [row[column] for row in csv.DictReader(fh)]


def saved_epoch(run_dir: Path) -> int:
    """Epochs finished according to the checkpoint, which must load (its hash is verified); 0 without one."""
    path = run_dir / CHECKPOINT
    return load_checkpoint(path)[0]["train"]["epoch"] if path.exists() else 0


# --- the uninterrupted reference, and determinism across processes --------------------------------


@pytest.fixture(scope="module")
def brain_npz(shared_data: Path) -> Path:
    return shared_data / "mini-cpu" / "brain_mri_mini_64.npz"


@pytest.fixture(scope="module")
def reference(brain_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two uninterrupted ``python -m cass.cli.main pretrain`` runs, side by side, with different hash seeds."""
    root = tmp_path_factory.mktemp("reference")
    runs = [root / "a", root / "b"]
    logs = [root / "a.log", root / "b.log"]
    procs = []
    for i, (run, log) in enumerate(zip(runs, logs, strict=True)):
        with open(log, "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "cass.cli.main", *pretrain_args(brain_npz, run)],
                                          env=run_env(root / f"cache_{i}", hash_seed=i + 1), stdout=out,
                                          stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=RUN_LIMIT_S) == 0, log.read_text()[-3000:]
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def steps_per_epoch(reference: tuple[Path, Path]) -> int:
    return int(metrics(reference[0], "step")[0])


def test_two_independent_runs_give_bitwise_identical_weights(reference: tuple[Path, Path]) -> None:
    first, second = reference
    assert_same_weights(first, second)
    assert metrics(first, "loss") == metrics(second, "loss") and len(metrics(first, "loss")) == EPOCHS


def subsets_and_views_digest(npz: str) -> str:
    """A digest of the label-fraction subsets and of augmented views (two epochs) of seed 5."""
    from cass.data import ImageDataset, open_images
    from cass.data.transforms import cass_augmentation
    from cass.data.subsets import label_fraction_indices

    images = open_images(npz)
    digest = hashlib.sha256()
    for fraction in (0.01, 0.1, 0.5):
        digest.update(label_fraction_indices(images.targets, fraction, seed=5).tobytes())
    views = ImageDataset(images, cass_augmentation(32), seed=5)
    for epoch in (0, 1):
        views.set_epoch(epoch)
        for i in range(0, len(images), 7):
            digest.update(views[i][0].numpy().tobytes())
    return digest.hexdigest()


def test_same_seed_gives_the_same_subsets_and_augmentations_in_another_process(
    brain_npz: Path, tmp_path: Path
) -> None:
    """Another process, with a fixed string-hash seed (this one's is random): nothing may hang on set order."""
    code = "import sys; from test_reliability import subsets_and_views_digest as d; print(d(sys.argv[1]))"
    other = subprocess.run([sys.executable, "-c", code, str(brain_npz)], cwd=TESTS, capture_output=True, text=True,
                           env=run_env(tmp_path, hash_seed=12345), timeout=120)
    assert other.returncode == 0, other.stderr[-3000:]
    here = subsets_and_views_digest(str(brain_npz))
    assert len(here) == 64 and other.stdout.strip() == here


# --- fault injection in forked CLI runs -----------------------------------------------------------


@dataclass
class Fault:
    """Where a run dies (or fails): at its n-th optimiser step, or at its n-th write or rename of ``file``.

    ``write`` leaves ``fraction`` of the file's bytes in the temporary file, then dies;
    ``rename`` dies right after the file was renamed into place; ``enospc`` fails the write as a
    full disk does; ``step`` dies just before an optimiser step (CASS steps one optimiser per
    network, so it can die between the two updates of one iteration).
    """

    kind: str
    n: int
    file: str = ""
    fraction: float = 1.0


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(fault: Fault) -> None:
    """Make this (forked) process meet ``fault``, by wrapping the functions production code calls."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cass.utils import checkpoint

    count = 0

    def reached() -> bool:
        nonlocal count
        count += 1
        return count == fault.n

    if fault.kind == "step":
        register_optimizer_step_pre_hook(lambda *_: die() if reached() else None)
    elif fault.kind in ("write", "enospc"):
        save_file = checkpoint.save_file

        def faulty_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            # _atomic_write writes to a temporary file named ".<final name>.<random>.tmp".
            if Path(filename).name.startswith(f".{fault.file}.") and reached():
                if fault.kind == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
                save_file(tensors, filename, metadata=metadata)
                os.truncate(filename, int(os.path.getsize(filename) * fault.fraction))
                die()
            save_file(tensors, filename, metadata=metadata)

        checkpoint.save_file = faulty_save_file
    elif fault.kind == "rename":
        replace = os.replace

        def replace_then_die(src: Any, dst: Any, **kwargs: Any) -> None:
            replace(src, dst, **kwargs)
            if Path(dst).name == fault.file and reached():
                die()

        os.replace = replace_then_die
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")


def serve() -> None:
    """Fork server: one request (JSON line on stdin) per run; answers the run's exit code.

    A negative code is the signal that ended the run. ``kill_after`` seconds after the fork the
    server SIGKILLs the run itself: only the parent of a process can kill it without any risk of
    hitting a recycled pid.
    """
    import cass.training.pretrain  # noqa: F401  (the imports every run needs, paid once here)

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request["argv"], request["log"], request["fault"])
        deadline = request["kill_after"] or RUN_LIMIT_S
        start = time.monotonic()
        while not (ended := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() - start < deadline:
            time.sleep(0.005)
        hung = False
        if not ended[0]:
            os.kill(pid, signal.SIGKILL)
            ended = os.waitpid(pid, 0)
            hung = not request["kill_after"]
        print(json.dumps({"code": os.waitstatus_to_exitcode(ended[1]), "hung": hung}), flush=True)


def child(argv: list[str], log: str, fault: dict[str, Any] | None) -> None:
    """Run ``cass argv`` in this forked process, output appended to ``log``; never returns."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        if fault:
            arm(Fault(**fault))
        app(args=argv, prog_name="cass")
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else int(end.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Runs:
    """The test side of :func:`serve`."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "from test_reliability import serve; serve()"],
                                     cwd=TESTS, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, argv: list[str], log: Path, fault: Fault | None = None, kill_after: float | None = None) -> int:
        request = {"argv": argv, "log": str(log), "fault": fault and dataclasses.asdict(fault),
                   "kill_after": kill_after}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the fork server died"
        result = json.loads(answer)
        assert not result["hung"], f"cass {' '.join(argv)} ran over {RUN_LIMIT_S} s: see {log}"
        return result["code"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    server = Runs(run_env(tmp_path_factory.mktemp("cache")))
    yield server
    server.close()


def continue_run(runs: Runs, data: Path, run_dir: Path, **kw: Any) -> int:
    """Resume ``run_dir`` (from scratch when no epoch finished), or start it again when it has no config yet."""
    argv = ["pretrain", "--resume", str(run_dir)] if (run_dir / "config.yaml").exists() else pretrain_args(data, run_dir)
    return runs.run(argv, run_dir.parent / "log.txt", **kw)


Plan = Callable[[int], tuple[Fault, float | None]]
"""Given the epochs still to do, the fault a run meets (and maybe a time to kill it at before that)."""


def interrupt_until_done(runs: Runs, data: Path, run_dir: Path, plan: Plan, kills: int) -> list[str]:
    """Kill ``kills`` runs of ``run_dir`` (each resuming the last), then let one finish; returns the kills."""
    done = []
    remaining = EPOCHS - saved_epoch(run_dir)
    while len(done) < kills and remaining:
        fault, kill_after = plan(remaining)
        code = continue_run(runs, data, run_dir, fault=fault, kill_after=kill_after)
        assert code == -signal.SIGKILL, f"{fault} (kill after {kill_after} s) did not kill the run: exit {code}"
        before, remaining = remaining, EPOCHS - saved_epoch(run_dir)
        assert remaining <= before, "the checkpoint went back in time"
        if fault.file == CHECKPOINT:  # killed while writing it: the previous one; once renamed: the new one
            assert remaining == before - (fault.kind == "rename"), f"{fault}: {before} -> {remaining} epochs to do"
        done.append(f"{fault} / timer {kill_after}: {before} -> {remaining} epochs to do")
    assert continue_run(runs, data, run_dir) == 0, (run_dir.parent / "log.txt").read_text()[-3000:]
    return done


def step_faults(rng: random.Random, steps_per_epoch: int) -> Plan:
    """A random optimiser step of the remaining work; half the time also a kill at a random time."""

    def plan(remaining: int) -> tuple[Fault, float | None]:
        fault = Fault("step", rng.randint(1, remaining * steps_per_epoch * OPTIMIZER_STEPS_PER_ITERATION))
        return fault, rng.choice([None, round(rng.uniform(0.05, 4.0), 2)])

    return plan


def write_faults(rng: random.Random) -> Plan:
    """A random write (cut at a random point) or rename of the checkpoint or of a weights file."""

    def plan(remaining: int) -> tuple[Fault, float | None]:
        file, n = rng.choice([CHECKPOINT, *WEIGHT_FILES]), rng.randint(1, remaining)
        # Renaming the last checkpoint into place finishes the run, leaving nothing to kill later.
        if rng.random() < 0.25 and not (file == CHECKPOINT and n == remaining):
            return Fault("rename", n, file), None
        return Fault("write", n, file, rng.choice([0.0, 1.0, round(rng.random(), 3)])), None

    return plan


def test_sigkill_at_random_steps_and_times_resumes_to_the_same_weights(
    runs: Runs, brain_npz: Path, reference: tuple[Path, Path], steps_per_epoch: int, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = interrupt_until_done(runs, brain_npz, run_dir, step_faults(random.Random(11), steps_per_epoch),
                                kills=10)
    assert_same_weights(reference[0], run_dir)
    assert metrics(run_dir, "loss") == metrics(reference[0], "loss")
    assert len(done) == 10, done


def test_sigkill_while_writing_checkpoints_resumes_to_the_same_weights(
    runs: Runs, brain_npz: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = interrupt_until_done(runs, brain_npz, run_dir, write_faults(random.Random(12)), kills=9)
    assert_same_weights(reference[0], run_dir)
    assert metrics(run_dir, "loss") == metrics(reference[0], "loss")
    assert len(done) == 9, done


def test_sigkill_while_writing_the_last_weights_resumes_to_the_same_weights(
    runs: Runs, brain_npz: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    """A kill between the last epoch's checkpoint and its weights files must not leave stale weights behind."""
    run_dir = tmp_path / "run"
    fault = Fault("write", EPOCHS, WEIGHT_FILES[0], fraction=0.5)
    assert continue_run(runs, brain_npz, run_dir, fault=fault) == -signal.SIGKILL
    assert continue_run(runs, brain_npz, run_dir) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert_same_weights(reference[0], run_dir)
    assert not list(run_dir.glob(".*.tmp")), "the killed writer's temporary file was not cleaned up"


def test_full_disk_during_a_checkpoint_write_is_a_clear_error(runs: Runs, brain_npz: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert continue_run(runs, brain_npz, run_dir, fault=Fault("enospc", 2, CHECKPOINT)) == 2
    log = (tmp_path / "log.txt").read_text()
    assert f"error: could not write {run_dir / CHECKPOINT} (disk full); the previous file, if any, is intact" in log
    assert "Traceback" not in log
    assert saved_epoch(run_dir) == 1
    assert not list(run_dir.glob(".*.tmp")), "temporary file left behind"


# --- inputs -------------------------------------------------------------------------------------


def write_split(root: Path, images: np.ndarray, labels: list[str]) -> None:
    """PNG files and a labels.csv listing them."""
    from PIL import Image

    root.mkdir(parents=True)
    rows = ["path,label"]
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_validation_csv_with_a_class_unknown_to_training_is_refused(brain_npz: Path, tmp_path: Path) -> None:
    images = np.load(brain_npz)["images"][:6]
    write_split(tmp_path / "train", images[:4], ["glioma", "notumor", "glioma", "notumor"])
    write_split(tmp_path / "val", images[4:], ["glioma", "meningioma"])
    with pytest.raises(DataError, match=r"val/labels\.csv has classes \['meningioma'\] that .*train/labels\.csv lacks"):
        load_splits(tmp_path)


def test_one_percent_of_labels_keeps_a_rare_class_and_fine_tunes_beside_an_empty_one(
    brain_npz: Path, tmp_path: Path
) -> None:
    """A class with one training image is kept at 1 %; a named class without images is trained around."""
    from cass.training.finetune import finetune

    npz = np.load(brain_npz)
    images, labels = npz["images"], npz["labels"]
    val = np.arange(len(labels)) % 4 == 0
    train = np.flatnonzero(~val)
    rare = train[labels[train] == 3][:1]
    train = np.concatenate([train[labels[train] != 3], rare])
    classes = np.array([*npz["classes"], "unseen"])
    np.savez(tmp_path / "set.npz", train_images=images[train], train_labels=labels[train], val_images=images[val],
             val_labels=labels[val], test_images=images[val], test_labels=labels[val],  # own test split: the
             classes=classes)  # rare class has one image, too few to carve a test split from
    cfg = FinetuneConfig(data=DataConfig(data=str(tmp_path / "set.npz"), num_workers=0), cnn=TINY_CNN, img_size=32,
                         epochs=1, label_fraction=0.01, min_steps=0, out=str(tmp_path / "model"), accelerator="cpu")
    model_dir = finetune(cfg)
    subset = (model_dir / "subset.csv").read_text().splitlines()[1:]
    chosen = [int(line.split(",")[0]) for line in subset]
    assert sorted(labels[train][chosen].tolist()) == [0, 1, 2, 3], "one labelled image per class present"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["classes"] == classes.tolist() and metrics["num_samples"] == val.sum()
    head = [v for k, v in load_file(model_dir / "model.safetensors").items() if k.startswith("fc.")]
    assert head and all(t.shape[0] == len(classes) for t in head)


def test_pixel_limit_set_in_the_config_file_stops_the_run_naming_the_image(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASS_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  max_image_pixels: 20000\n")
    result = CliRunner().invoke(app, ["pretrain", "--config", str(config), "--data",
                                      str(shared_data / "mini-cpu" / "imagefolder_mini.zip"), "--cnn", TINY_CNN,
                                      "--vit", TINY_VIT, "--img-size", "32", "--accelerator", "cpu",
                                      "--num-workers", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert re.search(r"error: .*imagefolder_mini\.zip:\S+\.jpg: \d+x\d+ pixels exceeds the pixel limit of 20000",
                     result.output), result.output


# --- security -----------------------------------------------------------------------------------

@dataclass
class RunsCode:
    """Unpickling this runs a shell command, as a malicious checkpoint would: it creates ``marker``."""

    marker: Path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("entry", ["resume", "finetune-from-run", "init-file"])
def test_pickle_bombs_are_refused_at_every_entry_point(
    tmp_path: Path, brain_npz: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    """A pickle that would run code, as a checkpoint, as a run's weights, or as ``--init`` weights."""
    monkeypatch.setenv("CASS_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_yaml(PretrainConfig(data=DataConfig(data=str(brain_npz), num_workers=0), cnn=TINY_CNN, vit=TINY_VIT,
                             img_size=32, accelerator="cpu", out=str(run_dir)), run_dir / "config.yaml")
    marker = tmp_path / "pwned"
    bomb = pickle.dumps({"state_dict": {"w": RunsCode(marker)}})
    common = ["--accelerator", "cpu", "--num-workers", "0"]
    if entry == "resume":
        bad = run_dir / CHECKPOINT
        bad.write_bytes(bomb)
        argv = ["pretrain", "--resume", str(run_dir)]
    elif entry == "finetune-from-run":
        bad = run_dir / "cnn.safetensors"
        bad.write_bytes(bomb)
        argv = ["finetune", "--from", str(run_dir), "--data", str(brain_npz), "--val-data", str(brain_npz),
                "--out", str(tmp_path / "ft"), *common]
    else:
        bad = tmp_path / "evil.pt"
        torch.save({"state_dict": {"w": RunsCode(marker)}}, bad)
        argv = ["pretrain", "--init", str(bad), "--data", str(brain_npz), "--cnn", TINY_CNN, "--vit", TINY_VIT,
                "--img-size", "32", "--out", str(tmp_path / "new"), *common]
    result = CliRunner().invoke(app, argv)
    assert not marker.exists(), "unpickling ran code"
    assert result.exit_code == 2, result.output
    assert f"error: {bad}: " in result.output and "Traceback" not in result.output, result.output
