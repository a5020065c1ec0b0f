"""The benchmark of both stages' hot paths against their baselines: `run(cfg)` measures the
sections conf/bench.yaml selects and returns their figures as one JSON-ready dict.

Sections, all measured in one run:
  machine    the device's own ceilings: fp32 and bf16 matmul GFLOP/s, copy bandwidth GB/s
  tokenizer  VQ-GAN encode and decode images/s in the default and channels-last layouts, and
             one stage-one training step (autoencoder + discriminator) through TokenizerModule
  encode     scripts/encode.py's per-batch work: codes, CLIP image and caption embeddings
  sampling   tokens/s of the KV-cached `generate`, the naive full-recompute loop and cached
             bf16, per batch size, with and without classifier-free guidance; their ratios. On
             a GPU also the cached loops replaying a CUDA graph per step, in fp32 and bf16
  fusion     cached tokens/s with each way the prompt reaches the GPT (pooled prefix, early
             fusion, resampler, deep fusion) at one size, and each over the pooled prefix's

On a GPU (device=cuda) the settings under `cuda` in conf/bench.yaml replace the top-level ones
(fewer repeats, a lower naive_max_s: never fewer tokens), and sizes=auto picks the `gpu` sizes.

Every figure is the median over timed repeats after warm-up, with min and max. Peak memory is
the process's peak RSS during the measurement and, on CUDA, the max allocated. FLOPs come from
FlopCounterMode for the convolutional nets and CLIP, and from the model's size for the
generator. Models carry random weights: throughput does not depend on them.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from generator.bench.bars import bars, check_bars
from generator.bench.encode import encode_section
from generator.bench.fusion import fusion_section
from generator.bench.machine import ceilings_of, machine_section
from generator.bench.sampling import sampling_section
from generator.bench.timing import Settings
from generator.bench.tokenizer import tokenizer_section
from generator.pipeline import resolve_device

SECTIONS = ("tokenizer", "encode", "sampling", "fusion")


def for_device(cfg: DictConfig, device: torch.device) -> DictConfig:
    """`cfg` as measured on `device`: on a GPU, the settings under `cuda` in place of the
    top-level ones."""
    return OmegaConf.merge(cfg, cfg.cuda) if device.type == "cuda" else cfg


def size_set_name(cfg: DictConfig, device: torch.device) -> str:
    """quick where asked; `sizes`, where auto is gpu on a GPU and default elsewhere."""
    if cfg.quick:
        return "quick"
    if cfg.sizes == "auto":
        return "gpu" if device.type == "cuda" else "default"
    return str(cfg.sizes)


def selection(cfg: DictConfig, device: torch.device) -> DictConfig:
    size_set = size_set_name(cfg, device)
    if size_set not in cfg.size_sets:
        raise ValueError(f"sizes={size_set!r}: use auto or one of {sorted(cfg.size_sets)}.")
    chosen = cfg.size_sets[size_set]
    unknown = (
        [n for n in chosen.tokenizers if n not in cfg.tokenizers]
        + [n for n in chosen.pipelines if n not in cfg.pipelines]
        + [n for n in [*chosen.generators, *chosen.fusion_generators] if n not in cfg.generators]
    )
    if unknown:
        raise ValueError(
            f"size_sets.{size_set} names {unknown}, which bench.yaml does not define under "
            "tokenizers, pipelines or generators."
        )
    return chosen


def settings_of(cfg: DictConfig) -> Settings:
    """Warm-up and repeats as configured; quick runs one of each."""
    return Settings(
        resolve_device(cfg.device),
        warmup=1 if cfg.quick else cfg.warmup,
        repeats=1 if cfg.quick else cfg.repeats,
        min_repeats=1 if cfg.quick else min(cfg.min_repeats, cfg.repeats),
        budget_s=cfg.budget_s,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    unknown = sorted(set(cfg.sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"sections has {unknown}: choose from {list(SECTIONS)}.")
    check_bars(cfg.bars)
    device = resolve_device(cfg.device)
    cfg = for_device(cfg, device)
    settings = settings_of(cfg)
    chosen = selection(cfg, device)
    torch.manual_seed(cfg.seed)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    machine = machine_section(cfg, settings)
    ceilings = ceilings_of(machine)
    results: dict[str, Any] = {"machine": machine}
    if "tokenizer" in cfg.sections:
        tokenizers = dict(chosen.tokenizers)
        results["tokenizer"] = tokenizer_section(cfg, tokenizers, settings, ceilings)
    if "encode" in cfg.sections:
        pipelines = dict(chosen.pipelines)
        results["encode"] = encode_section(cfg, pipelines, settings, ceilings.fp32_gflops)
    if "sampling" in cfg.sections:
        results["sampling"] = sampling_section(
            cfg, list(chosen.generators), list(chosen.batch_sizes), settings, ceilings
        )
    if "fusion" in cfg.sections:
        results["fusion"] = fusion_section(
            cfg, list(chosen.fusion_generators), list(chosen.fusion_batch_sizes), settings, ceilings
        )
    results["bars"] = bars(results, cfg.bars)
    results["settings"] = {
        "sizes": size_set_name(cfg, device),
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "min_repeats": settings.min_repeats,
        "budget_s": settings.budget_s,
        "naive_max_s": cfg.naive_max_s,
        "seconds": time.perf_counter() - started,
        # other work on the machine distorts every figure: compare these with the core count
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }
    return results
