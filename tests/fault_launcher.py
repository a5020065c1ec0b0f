"""Run a script of scripts/ with a fault injected, for tests/test_faults.py.

    python tests/fault_launcher.py step N SCRIPT [overrides...]        kill before training step N
    python tests/fault_launcher.py batch N SCRIPT [overrides...]       kill in encode batch N
    python tests/fault_launcher.py write NAME N SCRIPT [overrides...]  kill half-way through the
                                                                       Nth write of a file NAME
    python tests/fault_launcher.py record FILE SCRIPT [overrides...]   no fault: save into FILE
                                                                       each optimiser's state as
                                                                       its first step finds it

Kills are SIGKILL. A write is killed after half of its bytes reached the disk, whether the script
writes the final name or a temporary one (`.NAME.<random>.tmp`, tokenizer.base.files.atomic_write), so
the test sees what a kill during that write leaves. Nothing here is part of the project's code.
"""

import copy
import fnmatch
import os
import pathlib
import runpy
import signal
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def final_name(path) -> str:
    """The name a write is meant for: NAME for atomic_write's temporary `.NAME.<random>.tmp`."""
    name = pathlib.Path(path).name
    if name.startswith(".") and name.endswith(".tmp"):
        return name[1:].rsplit(".", 2)[0]
    return name


def write_half_and_die(path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
    die()


def kill_in_write(pattern: str, count: int) -> None:
    """Route every file write the scripts make through a counter of the names matching pattern."""
    seen = 0

    def write_or_die(path, data: bytes) -> int:
        nonlocal seen
        if fnmatch.fnmatch(final_name(path), pattern):
            seen += 1
            if seen == count:
                write_half_and_die(path, data)
        with open(path, "wb") as file:
            return file.write(data)

    def write_text(path, text: str, encoding=None, errors=None, newline=None) -> int:
        return write_or_die(path, text.encode(encoding or "utf-8", errors or "strict"))

    pathlib.Path.write_bytes = lambda path, data: write_or_die(path, bytes(data))
    pathlib.Path.write_text = write_text


def kill_before_step(count: int) -> None:
    """Kill before training step N: the Nth step of the first optimiser to step (the
    tokenizer's discriminator steps after its autoencoder, in the same training step)."""
    steps = []

    def before_step(optimizer, args, kwargs) -> None:
        if not steps or optimizer is steps[0]:
            steps.append(optimizer)
        if len(steps) == count:
            die()

    register_optimizer_step_pre_hook(before_step)


def kill_in_batch(count: int) -> None:
    import generator.encoding

    encode_batch = generator.encoding.encode_batch
    batches = 0

    def encode_or_die(*args, **kwargs):
        nonlocal batches
        batches += 1
        if batches == count:
            die()
        return encode_batch(*args, **kwargs)

    generator.encoding.encode_batch = encode_or_die


def record_first_steps(path: str) -> None:
    """Save each optimiser's state_dict as its first step finds it: what the resume restored."""
    first_states = {}

    def before_step(optimizer, args, kwargs) -> None:
        if id(optimizer) not in first_states:
            first_states[id(optimizer)] = copy.deepcopy(optimizer.state_dict())  # steps go on
            torch.save(list(first_states.values()), path)

    register_optimizer_step_pre_hook(before_step)


def main() -> None:
    point, *rest = sys.argv[1:]
    if point == "write":
        pattern, count, script, *overrides = rest
        kill_in_write(pattern, int(count))
    else:
        argument, script, *overrides = rest
        inject = {"step": kill_before_step, "batch": kill_in_batch, "record": record_first_steps}
        inject[point](argument if point == "record" else int(argument))
    sys.argv = [script, *overrides]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
