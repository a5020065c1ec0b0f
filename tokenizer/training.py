"""Lightning wiring shared by every training stage: run directory layout, trainer, resume.

Every stage trains into one run directory:
    RUN/<stage>/              exported inference weights (safetensors + config.json)
    RUN/checkpoints/<stage>/  Lightning checkpoints, `last.ckpt` is what a rerun resumes from
    RUN/logs/<stage>/         CSV (and TensorBoard where installed) logs and image grids
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (emulated bf16 is far slower)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512_BF16" in capability or "AMX" in capability


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` picks bf16 mixed precision where the hardware runs it natively, else fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def checkpoint_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


def last_checkpoint(run_dir: str | Path, stage: str) -> Path | None:
    """The checkpoint a rerun resumes from, or None on a fresh run."""
    path = checkpoint_dir(run_dir, stage) / "last.ckpt"
    return path if path.is_file() else None


def loggers(run_dir: str | Path, stage: str) -> list:
    """CSV logs always; TensorBoard as well where it is installed."""
    root = Path(run_dir) / "logs"
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
    checkpoints = ModelCheckpoint(
        dirpath=checkpoint_dir(run_dir, stage),
        every_n_train_steps=checkpoint_every_n_steps,
        save_last=True,
        save_top_k=0,  # last.ckpt is the one a rerun needs
    )
    return L.Trainer(
        default_root_dir=str(run_dir),
        logger=loggers(run_dir, stage),
        callbacks=[checkpoints, *(callbacks or [])],
        **options,
    )


def fit_and_checkpoint(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    run_dir,
    stage: str,
) -> None:
    """Fit, resuming from RUN/checkpoints/<stage>/last.ckpt where one exists, and leave a
    last.ckpt of the final step behind, so a rerun of a finished run has nothing to redo."""
    resume_from = last_checkpoint(run_dir, stage)
    if resume_from is not None:
        print(f"Resuming from {resume_from}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    final = checkpoint_dir(run_dir, stage) / "last.ckpt"
    partial = final.with_name("last.ckpt.partial")
    trainer.save_checkpoint(partial, weights_only=False)  # full state: optimisers too
    if trainer.is_global_zero:
        os.replace(partial, final)
