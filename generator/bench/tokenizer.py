"""The tokenizer section: VQ-GAN encode and decode images/s in the default and channels-last
layouts, and one stage-one training step (autoencoder + discriminator) run by TokenizerModule
under a Lightning Trainer, as scripts/train_tokenizer.py runs it."""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from generator.bench.flops import flop_counter_mode
from generator.bench.machine import Ceilings
from generator.bench.memory import cuda_peak_mb, current_rss_mb, peak_rss_mb, reset_peak_memory
from generator.bench.progress import per_s, progress
from generator.bench.timing import (
    Measurement,
    Settings,
    measure,
    report,
    stats,
    synchronize,
    timed_repeats,
)
from tokenizer import VQGAN
from tokenizer.base.training import resolve_precision
from tokenizer.data import Sample
from tokenizer.losses import vgg_checkpoint_path
from tokenizer.module import TokenizerModule


class TokenizerSpec(NamedTuple):
    model: Any  # VQGANConfig
    loss: Any  # LossConfig
    optim: Any  # OptimConfig
    perceptual: str  # "on" or why it is off


def tokenizer_spec(node: DictConfig) -> TokenizerSpec:
    """A tokenizer preset with its discriminator and GAN term on from the first step, and LPIPS
    on only where its VGG weights are on disk (the benchmark never downloads)."""
    model = instantiate(node.model, _convert_="all")
    loss = instantiate(node.loss, _convert_="all")
    optim = instantiate(node.optim, _convert_="all")
    perceptual = "on"
    if loss.perceptual_weight > 0 and not vgg_checkpoint_path().is_file():
        perceptual = f"off: no LPIPS VGG weights at {vgg_checkpoint_path()}"
        loss = dataclasses.replace(loss, perceptual_weight=0.0)
    elif loss.perceptual_weight == 0:
        perceptual = "off in the preset"
    loss = dataclasses.replace(
        loss, disc_start_step=0, disc_warmup_steps=0, perceptual_download=False
    )
    return TokenizerSpec(model, loss, optim, perceptual)


def random_images(count: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.rand(count, 3, size, size, device=device) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def codec_section(
    spec: TokenizerSpec, batch_size: int, settings: Settings, ceiling: float
) -> dict[str, Any]:
    """encode and decode images/s in both memory layouts, and their channels-last ratios."""
    model = VQGAN(spec.model).to(settings.device).eval()
    images = random_images(batch_size, spec.model.image_size, settings.device)
    codes = model.encode(images)
    results: dict[str, Any] = {}
    for layout, memory_format in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        model = model.to(memory_format=memory_format)
        pixels = images.contiguous(memory_format=memory_format)
        for name, run in (
            ("encode", lambda m=model, x=pixels: m.encode(x)),
            ("decode", lambda m=model: m.decode(codes)),
        ):
            measurement = measure(run, settings, with_flops=True)
            results[f"{name}_{layout}"] = report(
                measurement, batch_size, "images", measurement.flops, ceiling
            )
    for name in ("encode", "decode"):
        default = results[f"{name}_contiguous"]["images_per_s"]["median"]
        channels_last = results[f"{name}_channels_last"]["images_per_s"]["median"]
        results[f"{name}_channels_last_over_contiguous"] = channels_last / default
    return results


class StepTimer(L.Callback):
    """Times training steps: the first counts FLOPs and module calls, `warmup` steps in all are
    untimed, then as many timed steps as the budget allows before it stops the trainer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.warmup = max(1, settings.warmup)
        self.warmups: list[float] = []
        self.seconds: list[float] = []
        self.wanted = settings.repeats
        self.flops = 0.0
        self.start_rss_mb = 0.0
        self.calls: dict[str, int] = {}
        self._counter: FlopCounterMode | None = None
        self._hooks: list = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self._count_calls(module)
            self._counter = flop_counter_mode()
            self._counter.__enter__()
        if batch_idx == self.warmup:
            self.wanted = timed_repeats(self.warmups, self.settings)
            reset_peak_memory(self.settings.device)
            self.start_rss_mb = current_rss_mb()
        synchronize(self.settings.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        synchronize(self.settings.device)
        elapsed = time.perf_counter() - self._start
        if batch_idx == 0:
            self._counter.__exit__(None, None, None)
            self.flops = float(self._counter.get_total_flops())
            for hook in self._hooks:
                hook.remove()
        if batch_idx < self.warmup:
            self.warmups.append(elapsed)
            return
        self.seconds.append(elapsed)
        if len(self.seconds) >= self.wanted:
            trainer.should_stop = True

    def _count_calls(self, module: TokenizerModule) -> None:
        parts = {
            "encoder": module.vqgan.encoder,
            "decoder": module.vqgan.decoder,
            "discriminator": module.loss.discriminator,
        }
        for name, part in parts.items():
            self.calls[name] = 0
            self._hooks.append(part.register_forward_hook(self._counting(name)))

    def _counting(self, name: str) -> Callable:
        def hook(*_) -> None:
            self.calls[name] += 1

        return hook


def bare_trainer(accelerator: str, precision: str, max_steps: int, **options: Any) -> L.Trainer:
    """A Trainer that only trains, on one device: one epoch of at most `max_steps`, with no
    logger, checkpoint, validation, progress bar or model summary. For measured steps."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **options,
    )


def train_step_section(
    spec: TokenizerSpec, batch_size: int, settings: Settings, ceilings: Ceilings
) -> dict[str, Any]:
    """TokenizerModule's own training_step under a Lightning Trainer, as scripts/train_tokenizer
    runs it: the figure follows whatever the module does (one autoencoder forward or two)."""
    module = TokenizerModule.from_configs(spec.model, spec.loss, spec.optim)
    timer = StepTimer(settings)
    steps = timer.warmup + settings.repeats
    images = random_images(batch_size * steps, spec.model.image_size)
    loader = DataLoader([Sample(image, "") for image in images], batch_size=batch_size)
    accelerator = "gpu" if settings.device.type == "cuda" else "cpu"
    precision = resolve_precision("auto", accelerator)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as root:
        warnings.simplefilter("ignore")  # few loader workers, no validation: as intended
        trainer = bare_trainer(
            accelerator, precision, steps, callbacks=[timer], default_root_dir=root
        )
        trainer.fit(module, train_dataloaders=loader)
    measurement = Measurement(
        stats(timer.seconds),
        len(timer.seconds),
        peak_rss_mb(),
        timer.start_rss_mb,
        cuda_peak_mb(settings.device),
        timer.flops,
    )
    ceiling = ceilings.bf16_gflops if precision.startswith("bf16") else ceilings.fp32_gflops
    return {
        **report(measurement, batch_size, "images", timer.flops, ceiling),
        "precision": precision,
        "perceptual_loss": spec.perceptual,
        "module_calls_per_step": timer.calls,
    }


def tokenizer_section(
    cfg: DictConfig, batches: dict[str, int], settings: Settings, ceilings: Ceilings
) -> dict[str, Any]:
    results = {}
    for name, batch_size in batches.items():
        spec = tokenizer_spec(cfg.tokenizers[name])
        h, w = spec.model.grid_size
        results[name] = {
            "image_size": spec.model.image_size,
            "grid_size": [h, w],
            "num_codes": spec.model.quantizer.num_codes,
            "params": sum(p.numel() for p in VQGAN(spec.model).parameters()),
            "batch_size": batch_size,
            **codec_section(spec, batch_size, settings, ceilings.fp32_gflops),
            "train_step": train_step_section(spec, batch_size, settings, ceilings),
        }
        figures = results[name]
        progress(
            f"tokenizer {name}: encode {per_s(figures['encode_contiguous'], 'images')}, "
            f"decode {per_s(figures['decode_contiguous'], 'images')}, "
            f"training step {per_s(figures['train_step'], 'images')}"
        )
    return results
