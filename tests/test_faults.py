"""Faults: a kill, a full disk or an unwritable run directory loses nothing and corrupts nothing.

The slow tests SIGKILL the real scripts at chosen points (tests/fault_launcher.py), check that
every file under its final name is whole, then run the same command again.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from helpers import (
    TINY,
    encoded_files,
    make_encoded_run,
    read_checkpoint,
    run_script,
    save_clip,
    save_tokenizer,
)
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from safetensors.torch import load_file

from generator.export import load_generator
from generator.shards import read_shard
from tokenizer import VQGAN, VQGANConfig
from tokenizer.base.files import WriteError, check_writable
from tokenizer.base.run_dir import RunDir
from tokenizer.base.training import build_trainer, fit_and_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "fault_launcher.py"
BORING_TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "precision": "32-true",
    "max_steps": 4,
    "limit_val_batches": 0,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def fit_boring(run_dir: Path, stage: str = "boring") -> None:
    trainer = build_trainer(BORING_TRAINER, run_dir, stage, checkpoint_every_n_steps=2)
    fit_and_checkpoint(trainer, BoringModel(), BoringDataModule(), run_dir, stage)


# ---------------------------------------------------------------------------------------------
# Checkpoint writes, a full disk, an unwritable run directory


def test_checkpoints_are_fsynced_beside_their_final_name_then_renamed(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def record_replace(source, target) -> None:
        events.append(("rename", Path(source), Path(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    run_dir = tmp_path.resolve() / "run"
    fit_boring(run_dir)

    last = RunDir(run_dir).checkpoints("boring") / "last.ckpt"
    renames = [event for event in events if event[0] == "rename" and event[2] == last]
    assert len(renames) >= 2  # every checkpoint_every_n_steps, and the final one
    for event in renames:
        temporary = event[1]
        assert temporary.parent == last.parent
        assert re.fullmatch(r"\.last\.ckpt\..+\.tmp", temporary.name)
        assert events.index(("fsync", temporary)) < events.index(event)
    assert read_checkpoint(last)["global_step"] == 4


def test_a_rerun_removes_the_temporaries_a_kill_left_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    strays = [
        RunDir(run_dir).checkpoints("boring") / ".last.ckpt.k1ll3d.tmp",
        run_dir / "boring" / ".model.safetensors.k1ll3d.tmp",
    ]
    kept = run_dir / "boring" / "notes.txt"
    for path in (*strays, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    fit_boring(run_dir)
    assert not any(path.exists() for path in strays)
    assert kept.read_bytes() == b"half a file"


def checkpoint_writer(run_dir: Path):
    """What the trainers of every stage write their checkpoints with."""
    return build_trainer(BORING_TRAINER, run_dir, "boring", 2).strategy.checkpoint_io


def test_a_full_disk_keeps_the_old_checkpoint_and_says_what_to_do(tmp_path, monkeypatch):
    last = RunDir(tmp_path / "run").checkpoints("tokenizer") / "last.ckpt"
    writer = checkpoint_writer(tmp_path / "run")
    writer.save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, last)
    before = last.read_bytes()

    def write_half_then_fail(path: Path, data) -> int:
        with open(path, "wb") as file:
            file.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    message = (
        f"No space left on device while writing {last}: free space and run the same command "
        "again; nothing was replaced."
    )
    with pytest.raises(WriteError, match=re.escape(message)) as raised:
        writer.save_checkpoint({"global_step": 2, "weights": torch.zeros(1000)}, last)
    assert raised.value.errno == errno.ENOSPC
    assert last.read_bytes() == before
    assert list(last.parent.iterdir()) == [last]


@pytest.fixture
def small_disk(tmp_path):
    """A file system of 4 MiB of its own (a tmpfs: mounting it needs root, else the test skips)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)]
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_really_full_disk_keeps_the_old_checkpoint(small_disk):
    """Lightning's own writer copies its temporary file from /tmp over last.ckpt here, and the
    disk fills up half-way through the copy."""
    last = RunDir(small_disk / "run").checkpoints("tokenizer") / "last.ckpt"
    writer = checkpoint_writer(small_disk / "run")
    writer.save_checkpoint({"global_step": 1, "weights": torch.ones(100_000)}, last)  # 400 kB
    before = last.read_bytes()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(bytes(free - 200_000))
    with pytest.raises(WriteError, match=f"No space left on device while writing {last}: free"):
        writer.save_checkpoint({"global_step": 2, "weights": torch.zeros(200_000)}, last)
    assert last.read_bytes() == before
    assert list(last.parent.iterdir()) == [last]


def test_a_really_full_disk_keeps_the_old_export(small_disk):
    """safetensors' own writer fails with its own error type half-way through the file: the
    exports go through atomic_write instead, so the message and the old file are the same."""
    exported = small_disk / "run" / "tokenizer"
    model = VQGAN(VQGANConfig.tiny())
    model.save_pretrained(exported)
    before = (exported / "model.safetensors").read_bytes()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(bytes(free - len(before) // 2))
    with torch.no_grad():
        model.quantizer.codebook.zero_()
    weights = exported / "model.safetensors"
    with pytest.raises(WriteError, match=f"No space left on device while writing {weights}: free"):
        model.save_pretrained(exported)
    assert weights.read_bytes() == before
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]


def test_check_writable_creates_the_run_dir_or_names_it_and_the_fix(tmp_path):
    check_writable(tmp_path / "new" / "run")
    assert list((tmp_path / "new" / "run").iterdir()) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match=f"run_dir={blocker / 'run'} cannot be written"):
        check_writable(blocker / "run")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    "script", ["train_tokenizer.py", "train_clip.py", "train_generator.py", "encode.py"]
)
def test_an_unwritable_run_dir_stops_each_script_with_one_sentence(tmp_path, script):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script(script, f"run_dir={blocker / 'run'}")
    assert result.returncode == 1
    assert (
        f"run_dir={blocker / 'run'} cannot be written (Not a directory): a part of the path is "
        "a file, not a folder: choose another run_dir, then run the same command again."
    ) in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# kill -9, then the same command again


def launch(fault: list[str], script: str, overrides: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(LAUNCHER), *fault, str(ROOT / "scripts" / script), *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_killed_leaving_whole_files(
    killed: subprocess.CompletedProcess, injection: list[str], run_dir: Path
) -> None:
    """The kill happened (half-way through a write: half a temporary file is left), and what a
    reader finds under a final name loads: no half checkpoint, weights file, shard or JSON."""
    assert killed.returncode == -9, killed.stderr[-3000:]
    for path in run_dir.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix == ".ckpt":
            read_checkpoint(path)
        elif path.suffix == ".safetensors" and path.name.startswith("shard-"):
            read_shard(path)
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    if injection[0] == "write":
        assert list(run_dir.rglob(".*.tmp"))


def assert_same_optimizer_states(found: list[dict], expected: list[dict]) -> None:
    assert len(found) >= 1
    for state, wanted in zip(found, expected, strict=False):
        assert state["state"].keys() == wanted["state"].keys()
        for index, values in state["state"].items():
            assert int(values["step"]) == int(wanted["state"][index]["step"])
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(values[name], wanted["state"][index][name])


class Stage(NamedTuple):
    script: str
    name: str
    overrides: list[str]  # tiny settings
    load: Callable  # of what it exports, from RUN/<name>


class Fault(NamedTuple):
    injection: list[str]  # fault_launcher.py's arguments
    saved_step: int  # the global step of the last complete checkpoint it leaves


TRAIN_SETTINGS = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=1000",
    "trainer.enable_progress_bar=false",
    "checkpoint_every_n_steps=2",
]
STAGES = {
    "tokenizer": Stage(
        "train_tokenizer.py", "tokenizer", [*TINY, *TRAIN_SETTINGS], VQGAN.from_pretrained
    ),
    "generator": Stage(
        "train_generator.py",
        "generator",
        [
            "generator=tiny",
            "data.batch_size=4",
            "data.num_workers=0",
            "samples.every_n_steps=0",
            *TRAIN_SETTINGS,
        ],
        load_generator,
    ),
}
TRAIN_FAULTS = {  # max_steps 6, a checkpoint every 2
    "during_step_5": Fault(["step", "5"], saved_step=4),
    "during_second_checkpoint": Fault(["write", "last.ckpt", "2"], saved_step=2),
    "during_export": Fault(["write", "model.safetensors", "1"], saved_step=6),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", TRAIN_FAULTS)
@pytest.mark.parametrize("stage", STAGES)
def test_killed_training_resumes_from_its_last_complete_checkpoint(tmp_path, stage, fault):
    """The rerun is the same command; the launcher only records the optimiser states it
    restored."""
    stage, fault = STAGES[stage], TRAIN_FAULTS[fault]
    run_dir = tmp_path / "run"
    if stage.name == "generator":
        make_encoded_run(run_dir)
    overrides = [f"run_dir={run_dir}", *stage.overrides]
    killed = launch(fault.injection, stage.script, overrides)
    assert_killed_leaving_whole_files(killed, fault.injection, run_dir)
    last = RunDir(run_dir).checkpoints(stage.name) / "last.ckpt"
    saved = read_checkpoint(last)
    assert saved["global_step"] == fault.saved_step
    assert not (run_dir / stage.name / "model.safetensors").exists()

    restored = tmp_path / "restored.pt"
    rerun = launch(["record", str(restored)], stage.script, overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {last}" in rerun.stdout
    final = read_checkpoint(last)
    if fault.saved_step < 6:  # the first step after the resume found the saved optimiser state
        found = torch.load(restored, weights_only=True)
        assert_same_optimizer_states(found, saved["optimizer_states"])
    else:  # nothing left to train: the final checkpoint is the one the rerun restored
        assert not restored.exists()
        assert_same_optimizer_states(final["optimizer_states"], saved["optimizer_states"])
    assert final["global_step"] == 6
    assert int(final["optimizer_states"][0]["state"][0]["step"]) == 6
    stage.load(run_dir / stage.name)
    assert not list(run_dir.rglob(".*.tmp"))


ENCODE_OVERRIDES = [
    "clip=tiny",
    "data.num_train=12",
    "data.num_val=4",
    "data.batch_size=2",
    "data.num_workers=0",
    "shard_size=4",
    "device=cpu",
]
ENCODE_FAULTS = {  # 2 samples a batch, 4 a shard: train shards 0-2, then val shard 0
    "during_batch_4": ["batch", "4"],  # the second batch of train shard 1
    "during_second_shard": ["write", "shard-*.safetensors", "2"],
    "during_manifest": ["write", "manifest.json", "1"],
}


class EncodeRuns(NamedTuple):
    fresh: Path  # RUN/tokenizer and RUN/clip
    whole: Path  # a copy after an uninterrupted encode


@pytest.fixture(scope="module")
def encode_runs(tmp_path_factory) -> EncodeRuns:
    fresh = tmp_path_factory.mktemp("fresh")
    save_tokenizer(fresh)
    save_clip(fresh)
    whole = tmp_path_factory.mktemp("whole") / "run"
    shutil.copytree(fresh, whole)
    result = run_script("encode.py", f"run_dir={whole}", *ENCODE_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    return EncodeRuns(fresh, whole)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ENCODE_FAULTS)
def test_killed_encode_ends_with_the_bytes_of_an_uninterrupted_one(tmp_path, encode_runs, fault):
    fresh, whole = encode_runs
    run_dir = tmp_path / "run"
    shutil.copytree(fresh, run_dir)
    overrides = [f"run_dir={run_dir}", *ENCODE_OVERRIDES]
    killed = launch(ENCODE_FAULTS[fault], "encode.py", overrides)
    assert_killed_leaving_whole_files(killed, ENCODE_FAULTS[fault], run_dir)
    assert not (run_dir / "encoded" / "manifest.json").exists()

    rerun = run_script("encode.py", *overrides)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert encoded_files(run_dir) == encoded_files(whole)
