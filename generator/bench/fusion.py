"""The fusion section: cached sampling with each way the prompt reaches the GPT
(generator/conditioning/fusion.py) at one model size, as tokens/s and as a ratio to the pooled
prefix's, measured in the same run.

The fusions other than pooled read CLIP's token features: random ones of `clip_tokens`' shape
(ViT-B-32's text tower: 77 tokens of width 512), every token real, so early fusion's prefix and
deep fusion's cross-attention are as long as they get. A generator entry may set its own
`num_condition_tokens` and `token_dim` (the shapes entry: 24 x 64, the shapes CLIP's width and
3 tokens more than its 21).
FLOPs are FlopCounterMode's count of one run, before the warm-up; the weights read per sampling
step are the blocks', deep fusion's cross-attention blocks', the final norm's and the head's.
For the generators named in `fusion_train_generators` one training step (forward, backward,
AdamW) is timed too, at `fusion_train_batch_size` images.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from generator.bench.flops import count_flops
from generator.bench.machine import Ceilings
from generator.bench.progress import per_s, progress
from generator.bench.sampling import (
    generator_config,
    ratio,
    sampling_cases,
    sampling_report,
    step_weight_bytes,
)
from generator.bench.timing import Settings, measure, report
from generator.conditioning import Condition
from generator.gpt import GPT
from generator.sampling import SamplingOptions, generate


def fusion_model(cfg: DictConfig, name: str, fusion: str, device: torch.device) -> GPT:
    """Generator `name` of conf/bench.yaml with `fusion`, random weights from the bench's seed."""
    entry = OmegaConf.to_container(cfg.generators[name], resolve=True)
    length, width = cfg.clip_tokens
    entry.setdefault("num_condition_tokens", length)
    entry.setdefault("token_dim", width)
    config = generator_config(OmegaConf.create({**entry, "fusion": fusion}), cfg.clip_dim)
    torch.manual_seed(cfg.seed)
    # FlopCounterMode's module tracker hooks inputs that require grad, which inference mode
    # cannot give it: sampling runs without gradients, the training step turns them on
    return GPT(config).to(device).eval().requires_grad_(False)


def random_condition(model: GPT, batch_size: int, device: torch.device) -> Condition:
    """A pooled unit vector per row and, where the fusion reads them, token features."""
    config = model.config
    pooled = F.normalize(torch.randn(batch_size, config.clip_dim, device=device), dim=-1)
    if config.fusion == "pooled":
        return Condition(pooled)
    shape = (batch_size, config.num_condition_tokens)
    tokens = torch.randn(*shape, config.token_dim, device=device)
    return Condition(pooled, tokens, torch.ones(shape, dtype=torch.bool, device=device))


def fusion_case(
    model: GPT, batch_size: int, cfg_scale: float, settings: Settings, ceilings: Ceilings
) -> dict[str, Any]:
    """Cached fp32 sampling of one batch size and guidance setting."""
    options = SamplingOptions(cfg_scale=cfg_scale, seed=0, cuda_graph=False)
    rows = batch_size * (2 if cfg_scale != 1.0 else 1)
    condition = random_condition(model, batch_size, settings.device)

    def run() -> None:
        generate(model, condition, options)

    # Counted apart from measure's warm-up: sampling runs about 10x slower under FlopCounterMode,
    # and that warm-up's time would set the number of timed repeats
    flops = count_flops(run)
    measurement = measure(run, settings)
    codes = model.config.num_codes
    figures = sampling_report(
        measurement,
        batch_size * codes,
        flops,
        step_weight_bytes(model),
        codes,
        ceilings.fp32_gflops,
        ceilings.copy_gbps,
    )
    return {"batch_size": batch_size, "cfg_scale": cfg_scale, "rows": rows, "cached": figures}


def train_step_case(
    model: GPT, batch_size: int, settings: Settings, ceilings: Ceilings
) -> dict[str, Any]:
    """One training step of random codes and conditions: images/s."""
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (batch_size, model.config.num_codes)
    codes = torch.randint(model.config.vocab_size, shape, device=settings.device)
    condition = random_condition(model, batch_size, settings.device)

    def step() -> None:
        logits = model(codes, condition)  # (B, T, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    measurement = measure(step, settings, with_flops=True)
    model.eval().requires_grad_(False)
    return report(measurement, batch_size, "images", measurement.flops, ceilings.fp32_gflops)


def fusion_section(
    cfg: DictConfig,
    names: list[str],
    batch_sizes: list[int],
    settings: Settings,
    ceilings: Ceilings,
) -> dict[str, Any]:
    """For each generator, each fusion's cases and their tokens/s over the pooled prefix's."""
    results: dict[str, Any] = {}
    for name in names:
        results[name] = per_fusion = {}
        for fusion in cfg.fusions:
            model = fusion_model(cfg, name, fusion, settings.device)
            cases = {}
            for case, batch, scale in sampling_cases(batch_sizes, cfg.cfg_scales):
                cases[case] = fusion_case(model, batch, scale, settings, ceilings)
                tokens = per_s(cases[case]["cached"], "tokens")
                progress(f"fusion {name} {fusion} {case}: cached {tokens}")
            per_fusion[fusion] = {
                "params": model.num_parameters(),
                "prefix_length": model.config.prefix_length,
                "cases": cases,
            }
            if name in cfg.fusion_train_generators:
                batch = cfg.fusion_train_batch_size
                step = train_step_case(model, batch, settings, ceilings)
                per_fusion[fusion]["train_step"] = step
                progress(f"fusion {name} {fusion} training step: {per_s(step, 'images')}")
        add_ratios(per_fusion)
    return results


def add_ratios(per_fusion: dict[str, Any]) -> None:
    """Each figure over the pooled prefix's (None where pooled was not measured)."""
    pooled = per_fusion.get("pooled")
    for figures in per_fusion.values():
        for case, entry in figures["cases"].items():
            base = pooled["cases"][case]["cached"] if pooled else None
            entry["over_pooled"] = ratio(entry["cached"], base) if base else None
        if "train_step" in figures:
            base = pooled.get("train_step") if pooled else None
            figures["train_step_over_pooled"] = (
                ratio(figures["train_step"], base, "images") if base else None
            )
