"""The sampling section: tokens/s of the KV-cached `generate`, the naive full-recompute loop
and cached bf16, per batch size, with and without classifier-free guidance, and their ratios.
On a GPU the cached loops are measured eagerly and replaying a CUDA graph per step, in fp32 and
bf16 (`cached_graph`, `cached_bf16_graph`; each run's capture included); on a CPU there is no
graph to replay and no graph rows.

A generation's FLOPs and weight bytes come from the model's size (2 per weight per row and
token, plus 4 * dim per layer for every key a query attends to), checked against
FlopCounterMode on one cached run. A naive loop that would run longer than `naive_max_s` even at
the fp32 matmul ceiling is skipped with that estimate as the reason, except at batch 1 without
guidance.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from generator.bench.flops import count_flops
from generator.bench.machine import Ceilings
from generator.bench.progress import per_s, progress
from generator.bench.timing import (
    GB,
    Measurement,
    Settings,
    measure,
    report,
    skipped,
)
from generator.cuda_graph_step import GraphCaptureWarning
from generator.gpt import GPT, GPTConfig
from generator.precision import bf16_probe
from generator.sampling import SamplingOptions, generate, generate_naive

STEP_WEIGHTS = ("blocks", "cross_blocks", "norm", "head")  # what every sampling step reads


class GPTCost(NamedTuple):
    """What one generation of B' rows (2B under guidance) costs, counted from the model's size."""

    cached_flops: float
    naive_flops: float
    weight_bytes: float  # read once per step: every block, the final norm and the head


def matmul_weights(model: GPT) -> tuple[int, int]:
    """Weights of the blocks' linear layers, and of the head."""
    blocks = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    return blocks, model.head.weight.numel()


def gpt_cost(model: GPT, rows: int) -> GPTCost:
    config = model.config
    blocks, head = matmul_weights(model)
    prefix, codes = config.num_prefix_tokens, config.num_codes
    condition = 2 * sum(
        m.weight.numel()
        for m in model.conditioner.condition_mlp.modules()
        if isinstance(m, nn.Linear)
    )
    attention = 4 * config.dim * config.num_layers  # per (query, key) pair: q.k and p.v

    def forward(length: int, predicted: int) -> float:
        """A pass over `length` tokens (causal) with the head on the last `predicted`."""
        pairs = length * (length + 1) / 2
        return condition + 2 * blocks * length + attention * pairs + 2 * head * predicted

    prefill = forward(prefix, 1)
    steps = sum(2 * blocks + attention * (prefix + t) + 2 * head for t in range(1, codes))
    naive = sum(forward(prefix + n - 1, n) for n in range(1, codes + 1))
    return GPTCost(rows * (prefill + steps), rows * naive, step_weight_bytes(model))


def step_weight_bytes(model: GPT) -> int:
    """Bytes of the weights every sampling step reads: the blocks, deep fusion's cross-attention
    blocks, the final norm and the head."""
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if name.startswith(STEP_WEIGHTS)
    )


def sampling_report(
    measurement: Measurement,
    tokens: int,
    flops: float,
    weight_bytes: float,
    steps: int,
    ceiling: float,
    bandwidth: float,
) -> dict[str, Any]:
    weight_gbps = steps * weight_bytes / measurement.seconds.median / GB
    return {
        **report(measurement, tokens, "tokens", flops, ceiling),
        "weight_read_gbps": weight_gbps,
        "weight_read_fraction_of_copy_bandwidth": weight_gbps / bandwidth,
    }


def ratio(
    numerator: dict[str, Any], denominator: dict[str, Any], unit: str = "tokens"
) -> float | None:
    if "skipped" in numerator or "skipped" in denominator:
        return None
    key = f"{unit}_per_s"
    return numerator[key]["median"] / denominator[key]["median"]


def generator_config(node: DictConfig, clip_dim: int) -> GPTConfig:
    fields = OmegaConf.to_container(node, resolve=True)
    preset = fields.pop("preset")
    clip_dim = fields.pop("clip_dim", clip_dim)  # an entry may read a CLIP of its own width
    return GPTConfig.preset(preset, clip_dim=clip_dim, **fields)


class Sampler(NamedTuple):
    """What a sampling case runs: the fp32 model, its bf16 copy, and the choices."""

    model: GPT
    bf16_model: GPT
    bf16_mode: str  # auto | true | false
    naive_max_s: float


def bf16_skip_reason(mode: str, model: GPT, rows: int) -> str | None:
    """None where cached bf16 sampling runs at `rows` rows; otherwise why it is skipped.

    auto, on a CPU: where a bf16 linear of the loop's shape (rows x dim @ dim x 4 dim) is at
    least as fast as fp32 (generator/precision.py's probe, which the pipeline's precision=auto
    takes too). CPUs without native bf16 matrix instructions read half the bytes in a
    matrix-vector product but run products of several rows far slower than fp32."""
    if mode == "false":
        return "bf16=false"
    device = model.head.weight.device
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    if mode == "true":
        return None
    up = model.blocks[0].mlp.up
    times = bf16_probe(up, rows)
    if times.bf16_not_slower:
        return None
    return (
        f"a bf16 linear of this loop's shape ({rows} x {up.in_features} @ {up.in_features} x "
        f"{up.out_features}) takes {times.bf16 * 1e6:.0f} us against {times.fp32 * 1e6:.0f} us "
        "in fp32 on this CPU; bf16=true runs it anyway"
    )


def sampling_case(
    sampler: Sampler, batch_size: int, cfg_scale: float, settings: Settings, ceilings: Ceilings
) -> dict[str, Any]:
    """One batch size and guidance setting for each implementation, and their ratios."""
    model = sampler.model
    rows = batch_size * (2 if cfg_scale != 1.0 else 1)
    cost = gpt_cost(model, rows)
    codes = model.config.num_codes
    embedding = F.normalize(torch.randn(batch_size, model.config.clip_dim), dim=-1)
    embedding = embedding.to(settings.device)

    eager = SamplingOptions(cfg_scale=cfg_scale, seed=0, cuda_graph=False)

    def run(
        sample: Callable, gpt: GPT, flops: float, ceiling: float, options: SamplingOptions = eager
    ) -> dict[str, Any]:
        measurement = measure(lambda: sample(gpt, embedding, options), settings)
        weight_bytes = gpt_cost(gpt, rows).weight_bytes  # halved in bf16
        return sampling_report(
            measurement, batch_size * codes, flops, weight_bytes, codes, ceiling, ceilings.copy_gbps
        )

    results = {"batch_size": batch_size, "cfg_scale": cfg_scale, "rows": rows}
    results["cached"] = run(generate, model, cost.cached_flops, ceilings.fp32_gflops)
    estimate = cost.naive_flops / (ceilings.fp32_gflops * GB)
    always = rows == 1  # batch 1 without guidance: every generator gets its cached/naive ratio
    results["naive"] = (
        run(generate_naive, model, cost.naive_flops, ceilings.fp32_gflops)
        if always or estimate <= sampler.naive_max_s
        else skipped(
            f"{cost.naive_flops / GB:.0f} GFLOP: at least {estimate:.0f} s at the fp32 matmul "
            f"ceiling, more than naive_max_s={sampler.naive_max_s:g}"
        )
    )
    reason = bf16_skip_reason(sampler.bf16_mode, model, rows)
    results["cached_bf16"] = (
        run(generate, sampler.bf16_model, cost.cached_flops, ceilings.bf16_gflops)
        if reason is None
        else skipped(reason)
    )
    results["cached_over_naive"] = ratio(results["cached"], results["naive"])
    results["bf16_over_fp32_cached"] = ratio(results["cached_bf16"], results["cached"])
    results["bf16_cached_over_naive"] = ratio(results["cached_bf16"], results["naive"])
    if settings.device.type == "cuda":
        graphed = dataclasses.replace(eager, cuda_graph=True)
        results |= graph_cases(
            results,
            lambda gpt, ceiling: run(generate, gpt, cost.cached_flops, ceiling, graphed),
            sampler,
            ceilings,
        )
    return results


def graph_cases(
    eager: dict[str, Any],
    run_graph: Callable[[GPT, float], dict[str, Any]],
    sampler: Sampler,
    ceilings: Ceilings,
) -> dict[str, Any]:
    """The cached loops again, each step a replayed CUDA graph, and their ratios to eager;
    skipped where the eager loop was, or where the capture failed (sampling would have gone on
    eagerly, and the figure would not be the graph's)."""
    results = {}
    for eager_key, gpt, ceiling in (
        ("cached", sampler.model, ceilings.fp32_gflops),
        ("cached_bf16", sampler.bf16_model, ceilings.bf16_gflops),
    ):
        key = f"{eager_key}_graph"
        if "skipped" in eager[eager_key]:
            results[key] = eager[eager_key]
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphCaptureWarning)
            try:
                results[key] = run_graph(gpt, ceiling)
            except GraphCaptureWarning as failure:
                results[key] = skipped(f"the CUDA graph capture failed: {failure}")
    results["graph_over_eager"] = ratio(results["cached_graph"], eager["cached"])
    results["bf16_graph_over_eager"] = ratio(results["cached_bf16_graph"], eager["cached_bf16"])
    return results


def case_line(figures: dict[str, Any]) -> str:
    """A case's tokens/s, as its progress line shows them."""
    names = {"cached": "cached", "naive": "naive", "cached_bf16": "cached bf16"}
    names |= {"cached_graph": "graph", "cached_bf16_graph": "bf16 graph"}
    return ", ".join(
        f"{label} {per_s(figures[key], 'tokens')}" for key, label in names.items() if key in figures
    )


def flop_check(model: GPT, settings: Settings) -> float:
    """FlopCounterMode's count of one cached batch-1 generation over the analytic count."""
    embedding = torch.zeros(1, model.config.clip_dim, device=settings.device)
    options = SamplingOptions(seed=0, cuda_graph=False)  # a replayed graph passes no counter
    counted = count_flops(lambda: generate(model, embedding, options))
    return counted / gpt_cost(model, 1).cached_flops


def sampling_cases(
    batch_sizes: list[int], cfg_scales: list[float]
) -> Iterator[tuple[str, int, float]]:
    """Each case's name ("b8", "b8_cfg" with guidance), batch size and guidance scale."""
    for batch in batch_sizes:
        for scale in cfg_scales:
            yield f"b{batch}" + ("" if scale == 1.0 else "_cfg"), batch, scale


def sampling_section(
    cfg: DictConfig,
    names: list[str],
    batch_sizes: list[int],
    settings: Settings,
    ceilings: Ceilings,
) -> dict[str, Any]:
    bf16_mode = str(cfg.bf16).lower()
    if bf16_mode not in ("auto", "true", "false"):
        raise ValueError(f"bf16={cfg.bf16!r}: use auto, true or false.")
    results = {}
    for name in names:
        torch.manual_seed(cfg.seed)
        config = generator_config(cfg.generators[name], cfg.clip_dim)
        model = GPT(config).to(settings.device).eval()
        bf16_model = copy.deepcopy(model).to(torch.bfloat16)
        sampler = Sampler(model, bf16_model, bf16_mode, cfg.naive_max_s)
        blocks, head = matmul_weights(model)
        cases = {}
        for case, batch, scale in sampling_cases(batch_sizes, cfg.cfg_scales):
            cases[case] = figures = sampling_case(sampler, batch, scale, settings, ceilings)
            progress(f"sampling {name} {case}: {case_line(figures)}")
        results[name] = {
            "config": dataclasses.asdict(config),
            "params": model.num_parameters(),
            "matmul_weights": blocks + head,
            "tokens_per_image": config.num_codes,
            "weight_bytes_per_step_fp32": gpt_cost(model, 1).weight_bytes,
            "flop_counter_over_analytic": flop_check(model, settings),
            "cases": cases,
        }
    return results
