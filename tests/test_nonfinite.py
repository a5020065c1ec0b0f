"""A NaN or infinite loss skips its step's update in every stage; too many in a row stop training
with a checkpoint of the weights from before the first bad step."""

import copy
import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import pytest
import torch
from helpers import (
    TINY_SMALL,
    compose_config,
    fixed_batch_loader,
    random_images,
    run_script,
    tiny_module,
)
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from generator.clip import CLIPConfig
from generator.clip.data import CaptionBatch
from generator.clip.module import CLIPModule
from tokenizer.base.optim import NonFiniteLossError, OptimConfig
from tokenizer.base.training import build_trainer, fit_and_checkpoint
from tokenizer.data import Sample
from tokenizer.module import TokenizerModule


class Stage(NamedTuple):
    module: L.LightningModule
    loader: DataLoader


def nonfinite_at(module: L.LightningModule, bad_steps: range | set, value: float) -> Callable:
    """Turn a loss into `value` (keeping its graph) at the given global steps."""

    def poison(loss: torch.Tensor) -> torch.Tensor:
        return loss + value if module.global_step in bad_steps else loss

    return poison


def tokenizer_stage(monkeypatch, bad_steps, value: float, max_nonfinite_steps: int) -> Stage:
    """The tiny preset, its discriminator on from step 2; NaN in the autoencoder loss."""
    torch.manual_seed(0)
    cfg = compose_config("train_tokenizer", ["tokenizer=tiny"])
    optim = instantiate(cfg.tokenizer.optim, _convert_="all")
    module = TokenizerModule.from_configs(
        instantiate(cfg.tokenizer.model, _convert_="all"),
        instantiate(cfg.tokenizer.loss, _convert_="all"),
        dataclasses.replace(optim, max_nonfinite_steps=max_nonfinite_steps),
    )
    poison = nonfinite_at(module, bad_steps, value)
    autoencoder_loss = module.loss.autoencoder_loss

    def poisoned(*args, **kwargs):
        terms = autoencoder_loss(*args, **kwargs)
        return terms._replace(total=poison(terms.total))

    monkeypatch.setattr(module.loss, "autoencoder_loss", poisoned)
    samples = [Sample(image, "") for image in random_images(4)]
    return Stage(module, DataLoader(samples * 40, batch_size=4))


def generator_stage(monkeypatch, bad_steps, value: float, max_nonfinite_steps: int) -> Stage:
    """test_generator's tiny GPT with an EMA, whose update a skipped step must skip too."""
    module = tiny_module(ema_decay=0.9)
    module.optim_config.max_nonfinite_steps = max_nonfinite_steps
    poison = nonfinite_at(module, bad_steps, value)
    metrics = module.metrics

    def poisoned(batch, training: bool):
        result = metrics(batch, training)
        return result._replace(loss=poison(result.loss)) if training else result

    monkeypatch.setattr(module, "metrics", poisoned)
    return Stage(module, fixed_batch_loader())


def clip_stage(monkeypatch, bad_steps, value: float, max_nonfinite_steps: int) -> Stage:
    """test_clip's tiny CLIP on one fixed batch of four captioned images."""
    torch.manual_seed(0)
    optim = OptimConfig(warmup_steps=0, max_nonfinite_steps=max_nonfinite_steps)
    module = CLIPModule.from_configs(CLIPConfig(source="trained", **TINY_SMALL), optim)
    poison = nonfinite_at(module, bad_steps, value)
    contrastive = module.loss.forward
    monkeypatch.setattr(module.loss, "forward", lambda *args: poison(contrastive(*args)))
    batch = CaptionBatch(
        random_images(4), ["a red circle", "a blue square", "a green cat", "a tree"]
    )
    return Stage(module, DataLoader([batch] * 40, batch_size=None))


BUILDERS = {"tokenizer": tokenizer_stage, "generator": generator_stage, "clip": clip_stage}


class DataModule(L.LightningDataModule):
    def __init__(self, loader: DataLoader) -> None:
        super().__init__()
        self.loader = loader

    def train_dataloader(self) -> DataLoader:
        return self.loader


class TrainingState(NamedTuple):
    parameters: dict[str, torch.Tensor]  # every parameter, the generator's EMA included
    optimizers: list[dict[str, Any]]  # each optimiser's state (the schedule sets its lr apart)


class Snapshots(L.Callback):
    """The training state at the start of each global step."""

    def __init__(self) -> None:
        self.before: dict[int, TrainingState] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        self.before[trainer.global_step] = TrainingState(
            {name: p.detach().clone() for name, p in module.named_parameters()},
            [copy.deepcopy(optimizer.state_dict()["state"]) for optimizer in trainer.optimizers],
        )


def same(a: Any, b: Any) -> bool:
    """Equal nested dicts, lists and tensors; a NaN never equals itself, so it counts as a change."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def trainer_for(run_dir: Path, stage: str, max_steps: int, snapshots: Snapshots) -> L.Trainer:
    """The project's trainer (checkpoints in RUN/checkpoints/<stage>, CSV logs) at test size."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "max_steps": max_steps,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return build_trainer(options, run_dir, stage, 1000, callbacks=[snapshots])


def logged_skips(run_dir: Path, stage: str) -> list[float]:
    with open(run_dir / "logs" / stage / "metrics.csv") as file:
        rows = csv.DictReader(file)
        return [
            float(row["train/nonfinite_skipped"])
            for row in rows
            if row.get("train/nonfinite_skipped")
        ]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("stage", list(BUILDERS))
def test_a_nonfinite_loss_skips_the_update_and_training_goes_on(
    stage, value, monkeypatch, tmp_path
):
    module, loader = BUILDERS[stage](monkeypatch, {2}, value, max_nonfinite_steps=3)
    snapshots = Snapshots()
    trainer = trainer_for(tmp_path, stage, max_steps=5, snapshots=snapshots)
    trainer.fit(module, loader)

    assert trainer.global_step == 5  # the skipped batch counts as a step
    before, after, later = (snapshots.before[step] for step in (2, 3, 4))
    assert same(after.parameters, before.parameters), "a skipped step changed the weights"
    assert same(after.optimizers, before.optimizers), "a skipped step changed the optimiser"
    assert not same(later.parameters, after.parameters), "training did not go on"
    assert module.nonfinite_skipped == 1 and module.nonfinite_in_a_row == 0
    assert logged_skips(tmp_path, stage) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("stage", list(BUILDERS))
def test_nonfinite_losses_in_a_row_stop_with_the_weights_from_before_them(
    stage, monkeypatch, tmp_path
):
    module, loader = BUILDERS[stage](monkeypatch, range(3, 100), float("nan"), 3)
    snapshots = Snapshots()
    trainer = trainer_for(tmp_path, stage, max_steps=20, snapshots=snapshots)
    checkpoints = tmp_path / "checkpoints" / stage
    message = (
        f"{stage} training stopped after 3 steps in a row with a NaN or infinite loss "
        f"\\(from step 3 on\\), leaving {checkpoints / 'last.ckpt'} with the weights from before "
        "step 3: check the data"
    )
    with pytest.raises(NonFiniteLossError, match=message):
        fit_and_checkpoint(trainer, module, DataModule(loader), tmp_path, stage)

    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    good = snapshots.before[3]
    assert saved["global_step"] == 5  # the third bad step, which a rerun starts from
    assert same({name: saved["state_dict"][name] for name in good.parameters}, good.parameters)
    assert same([state["state"] for state in saved["optimizer_states"]], good.optimizers)
    assert saved["nonfinite_skipped"] == 3

    module, loader = BUILDERS[stage](monkeypatch, set(), float("nan"), 3)  # the data mended
    trainer = trainer_for(tmp_path, stage, max_steps=7, snapshots=Snapshots())
    fit_and_checkpoint(trainer, module, DataModule(loader), tmp_path, stage)
    assert trainer.global_step == 7 and module.nonfinite_skipped == 3  # resumed, count kept


def test_a_nonfinite_discriminator_loss_skips_only_the_discriminator_update(monkeypatch, tmp_path):
    module, loader = tokenizer_stage(monkeypatch, set(), float("nan"), max_nonfinite_steps=1)
    discriminator_loss = module.loss.discriminator_loss  # on from step 2

    def poisoned(images, reconstructions, step: int):
        terms = discriminator_loss(images, reconstructions, step)
        return terms._replace(total=terms.total + float("inf")) if step == 3 else terms

    monkeypatch.setattr(module.loss, "discriminator_loss", poisoned)
    snapshots = Snapshots()
    trainer_for(tmp_path, "tokenizer", max_steps=5, snapshots=snapshots).fit(module, loader)

    before, after = snapshots.before[3], snapshots.before[4]
    autoencoder, discriminator = after.optimizers
    assert same(discriminator, before.optimizers[1]), "the discriminator's optimiser stepped"
    assert not same(autoencoder, before.optimizers[0]), "the autoencoder's update was skipped"
    for name, parameter in after.parameters.items():
        unchanged = torch.equal(parameter, before.parameters[name])
        assert unchanged == name.startswith("loss.discriminator."), name
    assert module.nonfinite_skipped == 1  # counted, without stopping at max_nonfinite_steps=1


def test_max_nonfinite_steps_must_be_at_least_one():
    with pytest.raises(ValueError, match="optim.max_nonfinite_steps must be at least 1, got 0"):
        OptimConfig(max_nonfinite_steps=0)


@pytest.mark.slow
def test_the_script_exits_with_the_message_and_exports_nothing(encoded_run):
    """A learning rate of 1e30 makes the weights overflow after the first step: a real NaN."""
    result = run_script(
        "train_generator.py",
        f"run_dir={encoded_run}",
        "generator=tiny",
        "data.batch_size=4",
        "data.num_workers=0",
        "samples.every_n_steps=0",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=12",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.max_nonfinite_steps=3",
    )
    assert result.returncode != 0
    assert "generator training stopped after 3 steps in a row" in result.stderr
    assert (encoded_run / "checkpoints" / "generator" / "last.ckpt").is_file()
    assert not (encoded_run / "generator").exists()
