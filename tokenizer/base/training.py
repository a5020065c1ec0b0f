"""Lightning wiring shared by every training stage: the trainer, checkpoints and resume.

Every stage trains into one run directory (tokenizer/base/run_dir.py): RUN/<stage>/ for the
exported weights, RUN/checkpoints/<stage>/ for Lightning's checkpoints (`last.ckpt` is what a
rerun resumes from), RUN/logs/<stage>/ for CSV (and TensorBoard where installed) logs.

The same code runs on one device and under data parallelism (trainer=ddp or trainer=fsdp,
launched by torchrun or SLURM): Lightning splits map-style data between ranks with its
distributed sampler, and only rank zero prints, logs images and exports.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback as TrainerCallback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from tokenizer.base.files import atomic_write_bytes, remove_temporaries
from tokenizer.base.hardware import cpu_supports_bf16
from tokenizer.base.run_dir import RunDir
from tokenizer.base.side_by_side import CORES_FILE_VARIABLE


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` picks bf16 mixed precision where the hardware runs it natively, else fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def last_checkpoint(run_dir: str | Path, stage: str) -> Path | None:
    """The checkpoint a rerun resumes from, or None on a fresh run."""
    path = RunDir(run_dir).checkpoints(stage) / "last.ckpt"
    return path if path.is_file() else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every other file of the run: tokenizer.base.files.atomic_write.

    Lightning's own writer moves a temporary file from /tmp without fsync: where /tmp is another
    file system that move is a copy, and a kill or power cut during it leaves half a last.ckpt.
    The checkpoint is serialised in memory first (as Lightning does), so that a full disk is an
    OSError that atomic_write explains, not torch's RuntimeError from deep inside torch.save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())


class BatchReport(TrainerCallback):
    """Prints, once and on rank zero, how a step's batch is made up across devices.

    The learning rate is used as configured whatever the number of devices: Adam-style
    optimisers do not follow the linear scaling rule reliably, so scaling it is left to the user.
    """

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
        if per_device is None:
            return
        accumulate = trainer.accumulate_grad_batches
        effective = per_device * trainer.world_size * accumulate
        optim = getattr(module, "optim_config", None)
        lr = f"lr {optim.lr:g}" if optim is not None else "the learning rate"
        rank_zero_info(
            f"{trainer.world_size} device(s) x batch {per_device} x {accumulate} accumulated = "
            f"effective batch {effective}; {lr} is used as configured, not scaled with the "
            "effective batch: change it yourself when you change devices or batch size."
        )


class TakesFreedCores(TrainerCallback):
    """Side by side with another stage (tokenizer/base/side_by_side.py), a training starts on its
    share of the cores; once the other stage ends, it takes the cores that stage freed, from
    the file the pipeline names in its environment, read every `every` steps."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self.path = os.environ.get(CORES_FILE_VARIABLE)

    def on_train_batch_start(self, trainer: L.Trainer, module, batch, batch_index: int) -> None:
        if self.path is None or trainer.global_step % self.every:
            return
        try:
            cores = int(Path(self.path).read_text())
        except (OSError, ValueError):  # not written yet, or being replaced
            return
        if cores > torch.get_num_threads():
            torch.set_num_threads(cores)
            rank_zero_info(
                f"The stage beside this one ended: training goes on with {cores} threads."
            )


def loggers(run_dir: str | Path, stage: str) -> list:
    """CSV logs always; TensorBoard as well where it is installed."""
    root = RunDir(run_dir).logs(stage).parent
    found = [CSVLogger(root, name=stage, version="")]
    if importlib.util.find_spec("tensorboard") is not None:
        found.append(TensorBoardLogger(root, name=stage, version="", default_hp_metric=False))
    return found


def build_trainer(
    trainer_options: dict[str, Any],
    run_dir: str | Path,
    stage: str,
    checkpoint_every_n_steps: int,
    callbacks: list | None = None,
) -> L.Trainer:
    """A Lightning Trainer that checkpoints into RUN/checkpoints/<stage> and logs into RUN/logs."""
    options = dict(trainer_options)
    options.pop("_target_", None)
    options["precision"] = resolve_precision(
        str(options.get("precision", "auto")), str(options.get("accelerator", "auto"))
    )
    if isinstance(options.get("strategy"), dict):  # a strategy with settings (trainer=fsdp)
        options["strategy"] = instantiate(options["strategy"])
    checkpoints = ModelCheckpoint(
        dirpath=RunDir(run_dir).checkpoints(stage),
        every_n_train_steps=checkpoint_every_n_steps,
        save_last=True,
        save_top_k=0,  # last.ckpt is the one a rerun needs
    )
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=loggers(run_dir, stage),
        callbacks=[checkpoints, BatchReport(), TakesFreedCores(), *(callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        **options,
    )


def fit_and_checkpoint(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    run_dir,
    stage: str,
) -> L.LightningModule:
    """Fit, resuming from RUN/checkpoints/<stage>/last.ckpt where one exists, and leave a
    last.ckpt of the final step behind, so a rerun of a finished run has nothing to redo.
    Returns the trained module with whole tensors for rank zero to export (`whole_module`).

    Temporary files a killed run left in RUN/checkpoints/<stage> and RUN/<stage> are removed
    first: they are never read."""
    if trainer.is_global_zero:
        for folder in (RunDir(run_dir).checkpoints(stage), Path(run_dir) / stage):
            for stray in remove_temporaries(folder):
                print(f"Removed {stray}, left half-written by an interrupted run")
    resume_from = last_checkpoint(run_dir, stage)
    if resume_from is not None:
        print(f"Resuming from {resume_from}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except pickle.UnpicklingError:
        if resume_from is None:
            raise
        raise ValueError(
            f"{resume_from} holds pickled objects besides tensors and plain values, so it is not "
            "a checkpoint this project wrote and was not loaded (unpickling it could run any "
            f"code): delete {RunDir(run_dir).checkpoints(stage)} to train the {stage} from scratch."
        ) from None
    final = RunDir(run_dir).checkpoints(stage) / "last.ckpt"
    trainer.save_checkpoint(final, weights_only=False)  # full state: optimisers too
    return whole_module(trainer, module)


def whole_module(trainer: L.Trainer, module: L.LightningModule) -> L.LightningModule | None:
    """The module with whole tensors, for rank zero to export or sample from.

    Under FSDP each rank holds only a shard of every parameter: gathering them is a collective
    that every rank must enter, so all ranks call this; rank zero gets a CPU copy of the module
    with the whole tensors, the other ranks None. Other strategies keep whole replicas and
    return the module itself."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return module
    state = trainer.strategy.lightning_module_state_dict()  # whole on rank zero only
    if not trainer.is_global_zero:
        return None
    whole = type(module)(**module.hparams)
    whole.load_state_dict(state)
    return whole
