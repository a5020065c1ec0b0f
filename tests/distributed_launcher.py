"""Run a script of scripts/ as one rank of a torchrun job, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/distributed_launcher.py \
        DIR MODULE:DATASET SCRIPT [overrides...]

Every index fetched from a MODULE:DATASET instance is recorded (run with data.num_workers=0,
so fetches happen in the rank's own process). After the script's fit, each rank saves
DIR/rank<R>.pt: {"indices": [...], "state": the trained module's state_dict, None on FSDP's
other ranks}. CPUFSDPStrategy runs FSDP on CPU. Nothing here is part of the project's code.
"""

import importlib
import runpy
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

import tokenizer.base.training


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP over CPU processes (gloo). Lightning refuses its own FSDPStrategy without a GPU and
    wraps the model with the GPU's index as the device; the sharding, the collectives and the
    checkpoints are the same on CPU, where torch's FSDP needs the device named."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(
            module=model,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def record_fetches(target: str) -> list[int]:
    module_name, class_name = target.split(":")
    dataset_class = getattr(importlib.import_module(module_name), class_name)
    fetched: list[int] = []
    getitem = dataset_class.__getitem__

    def recording_getitem(self, index):
        fetched.append(int(index))
        return getitem(self, index)

    dataset_class.__getitem__ = recording_getitem
    return fetched


def save_after_fit(directory: Path, fetched: list[int]) -> None:
    fit_and_checkpoint = tokenizer.base.training.fit_and_checkpoint

    def fit_and_save(trainer, module, *args, **kwargs):
        trained = fit_and_checkpoint(trainer, module, *args, **kwargs)
        state = None  # FSDP's other ranks: the whole weights went to rank zero
        if trained is not None:
            state = {name: value.detach().cpu() for name, value in trained.state_dict().items()}
        record = {"indices": fetched, "state": state}
        torch.save(record, directory / f"rank{trainer.global_rank}.pt")
        return trained

    tokenizer.base.training.fit_and_checkpoint = fit_and_save


def main() -> None:
    directory, dataset, script, *overrides = sys.argv[1:]
    save_after_fit(Path(directory), record_fetches(dataset))
    sys.argv = [script, *overrides]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
