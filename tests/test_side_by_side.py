"""Scripts side by side: both run at once, each on its share of the cores, the first in the
terminal and the others into their log files; a failure is reported, never lost."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_script

from tokenizer.base.side_by_side import (
    CORES_FILE_VARIABLE,
    Job,
    available_cores,
    cores_file,
    run_side_by_side,
    shared_environment,
)
from tokenizer.base.training import TakesFreedCores

# Prints its thread count, writes a progress line to stderr, sleeps, then exits with argv[2].
CHILD = (
    "import os, sys, time; print('threads', os.environ.get('OMP_NUM_THREADS')); "
    "print('progress', file=sys.stderr); time.sleep(float(sys.argv[1])); sys.exit(int(sys.argv[2]))"
)
# Leaves its own mark (argv[1]), then waits up to 60 s for the other's (argv[2]): exits 0 only
# where the two ran at the same time; one after the other, the first gives up with 4.
MEETS = (
    "import os, sys, time; from pathlib import Path; print('threads', os.environ.get("
    "'OMP_NUM_THREADS')); print('progress', file=sys.stderr); Path(sys.argv[1]).touch(); "
    "deadline = time.monotonic() + 60\n"
    "while not Path(sys.argv[2]).exists() and time.monotonic() < deadline: time.sleep(0.01)\n"
    "sys.exit(0 if Path(sys.argv[2]).exists() else 4)"
)


# Prints whether its cores file is there at its start, then waits up to 60 s for it and
# prints what it holds.
WIDENS = (
    "import os, time; from pathlib import Path; path = Path(os.environ['"
    + CORES_FILE_VARIABLE
    + "']); print('at start', path.exists()); deadline = time.monotonic() + 60\n"
    "while not path.exists() and time.monotonic() < deadline: time.sleep(0.01)\n"
    "print('cores', path.read_text() if path.exists() else None)"
)


def job(tmp_path: Path, name: str, seconds: float, exit_code: int = 0) -> Job:
    command = [sys.executable, "-c", CHILD, str(seconds), str(exit_code)]
    return Job(name, command, tmp_path / "logs" / f"{name}.log")


def meeting_job(tmp_path: Path, name: str, other: str) -> Job:
    command = [sys.executable, "-c", MEETS, str(tmp_path / name), str(tmp_path / other)]
    return Job(name, command, tmp_path / "logs" / f"{name}.log")


def test_jobs_run_at_once_each_on_its_share_of_the_cores(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    first, second = run_side_by_side(
        [meeting_job(tmp_path, "a", other="b"), meeting_job(tmp_path, "b", other="a")]
    )
    # each saw the other's mark while it ran: both ran at once
    assert (first.name, first.returncode, second.name, second.returncode) == ("a", 0, "b", 0)
    assert first.stdout == second.stdout == "threads 2\n"
    shown = capsys.readouterr().out
    assert "threads 2" in shown and shown.count("threads") == 1  # only the first's, on the terminal
    assert (tmp_path / "logs" / "a.log").read_text() == "threads 2\n"
    assert (tmp_path / "logs" / "b.log").read_text() == "threads 2\n"
    assert (tmp_path / "logs" / "b.log.stderr").read_text() == "progress\n"


def test_each_job_is_timed_to_its_own_end(tmp_path):
    long, short = run_side_by_side([job(tmp_path, "long", 1.5), job(tmp_path, "short", 0.2)])
    assert long.seconds >= 1.5 and short.seconds >= 0.2
    assert short.seconds < long.seconds  # not to the end of the group


def test_a_job_alone_keeps_the_environment_as_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert shared_environment(1) is None
    (alone,) = run_side_by_side([job(tmp_path, "a", 0)])
    assert alone.stdout == "threads None\n"
    assert shared_environment(2)["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))


def test_a_failed_job_is_reported_after_the_other_ends(tmp_path):
    first, second = run_side_by_side([job(tmp_path, "a", 0, exit_code=3), job(tmp_path, "b", 1)])
    assert (first.returncode, second.returncode) == (3, 0)
    assert second.seconds >= 0.9  # it was waited for, not killed


def test_a_job_takes_the_cores_of_the_one_that_ended(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    widens = Job("b", [sys.executable, "-c", WIDENS], tmp_path / "logs" / "b.log")
    cores_file(widens).parent.mkdir(parents=True)
    cores_file(widens).write_text("9")  # left by an earlier run: removed before b starts
    first, second = run_side_by_side([job(tmp_path, "a", 0.5), widens])
    assert first.stdout == "threads 2\n"
    assert (second.returncode, second.stdout) == (0, "at start False\ncores 4\n")


def test_a_training_widens_to_the_cores_its_file_gives_it(tmp_path, monkeypatch):
    path = tmp_path / "clip.log.cores"
    monkeypatch.setenv(CORES_FILE_VARIABLE, str(path))
    callback = TakesFreedCores(every=10)
    threads = torch.get_num_threads()
    trainer = SimpleNamespace(global_step=0)
    try:
        torch.set_num_threads(1)
        callback.on_train_batch_start(trainer, None, None, 0)  # no file yet
        path.write_text("3")
        trainer.global_step = 5  # read every 10 steps
        callback.on_train_batch_start(trainer, None, None, 5)
        assert torch.get_num_threads() == 1
        trainer.global_step = 10
        callback.on_train_batch_start(trainer, None, None, 10)
        assert torch.get_num_threads() == 3
        path.write_text("2")  # never narrows
        trainer.global_step = 20
        callback.on_train_batch_start(trainer, None, None, 20)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_pipeline_groups_a_stage_with_the_one_it_runs_beside():
    stage_groups = load_script("pipeline.py").stage_groups
    stages = {"tokenizer": {}, "clip": {"beside": "tokenizer"}, "encode": {}, "extra": {}}
    assert stage_groups(stages) == [["tokenizer", "clip"], ["encode"], ["extra"]]
    with pytest.raises(ValueError, match="stages.encode.beside=tokenizer: a stage can only run"):
        stage_groups({"tokenizer": {}, "clip": {}, "encode": {"beside": "tokenizer"}})
