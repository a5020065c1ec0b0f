"""Scripts run as child processes, one at a time or several side by side on shared cores.

The first script of a group keeps the terminal: its output is shown, and its stdout also kept.
The others write stdout (Lightning's progress bar included) to their log file and stderr beside
it (`<log>.stderr`), so that two progress bars never fight over one line. Side by side, each
gets an equal share of the cores through OMP_NUM_THREADS, which torch reads when it starts:
two trainings of one thread each, rather than two of two threads spinning against each other
on the same two cores. When one ends, the ones still running get its cores: each job is told
its share in a file (`<log>.cores`, named by CORES_FILE_VARIABLE), which a training reads
every few steps (tokenizer/base/training.py, TakesFreedCores). A training that widens so
repeats its run to within rounding, not bit for bit: when it widens depends on the other's
speed, and a reduction split over more threads adds in another order.
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from tokenizer.base.files import atomic_write_text

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CORES_FILE_VARIABLE = "SIDE_BY_SIDE_CORES_FILE"


class Job(NamedTuple):
    """A script to run: scripts/<script>.py with its arguments, its stdout kept in log_file."""

    name: str
    command: list[str]
    log_file: Path


class Finished(NamedTuple):
    name: str
    returncode: int
    stdout: str
    seconds: float


def available_cores() -> int:
    """The cores this process may use: OMP_NUM_THREADS where the user set it, else the CPU
    affinity (what a container or taskset allows), else the machine's count."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def shared_environment(count: int) -> dict[str, str] | None:
    """The environment of `count` processes side by side: the cores split evenly (at least one
    thread each). None (the environment as it is) for a process alone."""
    if count == 1:
        return None
    threads = str(max(1, available_cores() // count))
    return {**os.environ, **dict.fromkeys(THREAD_VARIABLES, threads)}


def beside_log(job: Job, suffix: str) -> Path:
    """A file kept beside the job's log: `<log>.stderr`, `<log>.cores`."""
    return job.log_file.with_name(job.log_file.name + suffix)


def cores_file(job: Job) -> Path:
    return beside_log(job, ".cores")


class CoreShares:
    """The jobs of a group still running and each one's share of the cores: when one ends, the
    others' files get the cores shared among those left."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.cores = available_cores()
        self.running = list(jobs)
        self.lock = threading.Lock()
        for job in jobs:  # a file left by an earlier run would widen a job at its start
            cores_file(job).unlink(missing_ok=True)

    def environment(self, job: Job) -> dict[str, str] | None:
        shared = shared_environment(len(self.running))
        return None if shared is None else {**shared, CORES_FILE_VARIABLE: str(cores_file(job))}

    def ended(self, job: Job) -> None:
        with self.lock:
            self.running.remove(job)
            share = max(1, self.cores // max(1, len(self.running)))
            for other in self.running:
                atomic_write_text(cores_file(other), str(share))


def script_command(script: Path, arguments: Sequence[str]) -> list[str]:
    return [sys.executable, str(script), *arguments]


class QuietProcess:
    """A job whose stdout goes to its log file and stderr beside it, timed to its exit."""

    def __init__(
        self, job: Job, environment: dict[str, str] | None, on_exit: Callable[[Job], None]
    ) -> None:
        self.job, self.on_exit = job, on_exit
        job.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.began, self.ended = time.monotonic(), 0.0
        stderr_file = beside_log(job, ".stderr")
        with job.log_file.open("w") as stdout, stderr_file.open("w") as stderr:
            self.process = subprocess.Popen(
                job.command, stdout=stdout, stderr=stderr, env=environment, text=True
            )
        self.watcher = threading.Thread(target=self._wait, daemon=True)
        self.watcher.start()

    def _wait(self) -> None:
        self.process.wait()
        self.ended = time.monotonic()
        self.on_exit(self.job)

    def finish(self) -> Finished:
        self.watcher.join()
        stdout = self.job.log_file.read_text()
        return Finished(self.job.name, self.process.returncode, stdout, self.ended - self.began)


def run_in_terminal(job: Job, environment: dict[str, str] | None) -> Finished:
    """Run a job with its output on the terminal, its stdout also kept in its log file."""
    job.log_file.parent.mkdir(parents=True, exist_ok=True)
    began, lines = time.monotonic(), []
    with subprocess.Popen(
        job.command, stdout=subprocess.PIPE, text=True, bufsize=1, env=environment
    ) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    stdout = "".join(lines)
    atomic_write_text(job.log_file, stdout)
    return Finished(job.name, process.returncode, stdout, time.monotonic() - began)


def run_side_by_side(jobs: Sequence[Job]) -> list[Finished]:
    """Run the jobs at the same time, the first in the terminal, each on its share of the
    cores; returns when all have ended, in the jobs' order, failed ones included."""
    shares = CoreShares(jobs)
    environments = [shares.environment(job) for job in jobs]
    quiet = [
        QuietProcess(job, environment, shares.ended)
        for job, environment in zip(jobs[1:], environments[1:], strict=True)
    ]
    try:
        first = run_in_terminal(jobs[0], environments[0])
        shares.ended(jobs[0])
        for process in quiet:
            if process.process.poll() is None:
                print(f"Waiting for {process.job.name} (output in {process.job.log_file})")
        return [first, *(process.finish() for process in quiet)]
    except BaseException:
        for process in quiet:
            process.process.terminate()
        raise
