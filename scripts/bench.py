"""Benchmark the hot paths against their baselines; prints one JSON object last, writes `out`.

    python scripts/bench.py [device=cpu|cuda|auto] [sizes=default|all] [out=bench.json]
    python scripts/bench.py quick=true            # tiny sizes, one repeat: the test suite's run
    python scripts/bench.py sections=[sampling] size_sets.default.generators=[small_256]

Sections, all measured in one run:
  machine    the device's own ceilings: fp32 and bf16 matmul GFLOP/s, copy bandwidth GB/s
  tokenizer  VQ-GAN encode and decode images/s in the default and channels-last layouts, and
             one stage-one training step (autoencoder + discriminator) through TokenizerModule
  encode     scripts/encode.py's per-batch work: codes, CLIP image and caption embeddings
  sampling   tokens/s of the KV-cached `generate`, the naive full-recompute loop and cached
             bf16, per batch size, with and without classifier-free guidance; their ratios

Every figure is the median over timed repeats after warm-up, with min and max. A measurement
whose warm-up exceeds `budget_s` gets fewer repeats (at least `min_repeats`), never fewer
tokens or images. A naive loop that would run longer than `naive_max_s` even at the fp32
matmul ceiling is skipped with that estimate as the reason, except at batch 1 without
guidance. Peak memory is the process's peak RSS during the measurement (VmHWM, reset through
/proc/self/clear_refs where Linux allows it, else the peak of the whole process) and, on CUDA,
the max allocated. FLOPs come from FlopCounterMode for the convolutional nets and CLIP, and
from the model's size for the generator (2 per weight per row and token, plus 4 * dim per
layer for every key a query attends to), checked against FlopCounterMode on one cached run.
Models carry random weights: throughput does not depend on them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils import flop_counter
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from generator.clip import CLIPEncoder, ImagePreprocess, build_small_clip, clip_tokenizer
from generator.encoding import encode_batch
from generator.gpt import GPT, GPTConfig, Linear, packing
from generator.pipeline import resolve_device
from generator.sampling import generate, generate_naive
from generator.shards import EMBEDDING_DTYPE, EncodingPlan, codes_dtype
from tokenizer import VQGAN
from tokenizer.base.files import atomic_write_text
from tokenizer.base.training import resolve_precision
from tokenizer.data import Sample
from tokenizer.losses import vgg_checkpoint_path
from tokenizer.module import TokenizerModule

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("tokenizer", "encode", "sampling")
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
CAPTIONS = ("a red circle at the top left", "two blue squares", "a small green triangle")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Timing and memory


@dataclasses.dataclass(frozen=True)
class Settings:
    device: torch.device
    warmup: int
    repeats: int
    min_repeats: int
    budget_s: float


class Ceilings(NamedTuple):
    fp32_gflops: float
    bf16_gflops: float
    copy_gbps: float


class Stats(NamedTuple):
    median: float
    min: float
    max: float


class Measurement(NamedTuple):
    seconds: Stats
    repeats: int
    peak_rss_mb: float
    start_rss_mb: float  # resident before the timed runs: models, inputs, earlier sections
    cuda_max_allocated_mb: float | None
    flops: float | None  # FlopCounterMode's count for one run, where asked for


def stats(values: list[float]) -> Stats:
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return Stats(median, ordered[0], ordered[-1])


def rate(work: float, seconds: Stats) -> Stats:
    """Work per second: the median run's rate, the slowest run's (min) and the fastest's (max)."""
    return Stats(work / seconds.median, work / seconds.max, work / seconds.min)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def can_reset_peak_rss() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS


def status_mb(field: str) -> float | None:
    """A size from /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    current = status_mb("VmRSS")
    return current if current is not None else peak_rss_mb()


def cuda_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def timed(run: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def progress(text: str) -> None:
    """One line on stderr as each measurement ends, so a run stopped early keeps its figures."""
    print(text, file=sys.stderr, flush=True)


def per_s(entry: dict[str, Any], unit: str) -> str:
    """`entry`'s median rate, or why it was skipped."""
    if "skipped" in entry:
        return "skipped"
    return f"{entry[f'{unit}_per_s']['median']:,.1f} {unit}/s"


def cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter_mode() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU kernel of scaled_dot_product_attention (torch
    has formulas for the CUDA kernels only); attention is counted as the full square."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
        },
    )


def count_flops(run: Callable[[], Any]) -> float:
    with flop_counter_mode() as counter:
        run()
    return float(counter.get_total_flops())


def timed_repeats(warmup_seconds: list[float], settings: Settings) -> int:
    """Repeats within the budget, judged by the slowest warm-up run: at least min_repeats."""
    if not warmup_seconds:
        return settings.repeats
    fitting = int(settings.budget_s / max(max(warmup_seconds), 1e-9))
    return max(settings.min_repeats, min(settings.repeats, fitting))


def measure(run: Callable[[], Any], settings: Settings, with_flops: bool = False) -> Measurement:
    """Warm up (the first warm-up run counts FLOPs when asked), then time the repeats."""
    flops, warmups = None, []
    for index in range(max(settings.warmup, int(with_flops))):
        if index == 0 and with_flops:
            start = time.perf_counter()
            flops = count_flops(run)
            warmups.append(time.perf_counter() - start)
        else:
            warmups.append(timed(run, settings.device))
    count = timed_repeats(warmups, settings)
    reset_peak_memory(settings.device)
    start_rss = current_rss_mb()
    seconds = [timed(run, settings.device) for _ in range(count)]
    peak_cuda = cuda_peak_mb(settings.device)
    return Measurement(stats(seconds), count, peak_rss_mb(), start_rss, peak_cuda, flops)


def report(
    measurement: Measurement, work: float, unit: str, flops: float, ceiling_gflops: float
) -> dict[str, Any]:
    """A measurement as JSON: rate of `unit`, seconds, achieved GFLOP/s and fraction of ceiling."""
    achieved = flops / measurement.seconds.median / GB
    return {
        f"{unit}_per_s": rate(work, measurement.seconds)._asdict(),
        "seconds": measurement.seconds._asdict(),
        "repeats": measurement.repeats,
        "gflop_per_run": flops / GB,
        "achieved_gflops": achieved,
        "fraction_of_matmul_ceiling": achieved / ceiling_gflops,
        "peak_rss_mb": measurement.peak_rss_mb,
        "peak_rss_growth_mb": measurement.peak_rss_mb - measurement.start_rss_mb,
        "cuda_max_allocated_mb": measurement.cuda_max_allocated_mb,
    }


def skipped(reason: str) -> dict[str, str]:
    return {"skipped": reason}


# ---------------------------------------------------------------------------------------------
# The machine's ceilings


def matmul_size(dtype: torch.dtype, device: torch.device) -> int:
    """The smallest square size (from 256, doubling) whose product takes 20 ms: big enough to
    reach the ceiling, small enough that a slow dtype does not take minutes."""
    largest = 8192 if device.type == "cuda" else 4096
    size = 256
    while size < largest:
        a = torch.randn(size, size, device=device, dtype=dtype)
        timed(lambda a=a: a @ a, device)
        if timed(lambda a=a: a @ a, device) >= 0.02:
            break
        size *= 2
    return size


def matmul_ceiling(dtype: torch.dtype, settings: Settings) -> dict[str, Any]:
    size = matmul_size(dtype, settings.device)
    a = torch.randn(size, size, device=settings.device, dtype=dtype)
    b = torch.randn(size, size, device=settings.device, dtype=dtype)
    measurement = measure(lambda: a @ b, settings)
    return {
        "size": size,
        "gflops": rate(2 * size**3 / GB, measurement.seconds)._asdict(),
        "repeats": measurement.repeats,
    }


def copy_bandwidth(mib: int, settings: Settings) -> dict[str, Any]:
    """STREAM-copy bandwidth: bytes read plus bytes written per second. The source is filled
    first: an untouched allocation reads the shared zero page and would look impossibly fast."""
    source = torch.ones(mib * 2**20 // 4, device=settings.device)
    target = torch.zeros_like(source)
    measurement = measure(lambda: target.copy_(source), settings)
    return {
        "mib": mib,
        "gbps": rate(2 * source.nbytes / GB, measurement.seconds)._asdict(),
        "repeats": measurement.repeats,
    }


def machine_section(cfg: DictConfig, settings: Settings) -> dict[str, Any]:
    device = settings.device
    return {
        "device": device.type,
        "name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "peak_rss_scope": "measurement" if can_reset_peak_rss() else "process",
        "matmul_float32": matmul_ceiling(torch.float32, settings),
        "matmul_bfloat16": matmul_ceiling(torch.bfloat16, settings),
        "copy": copy_bandwidth(cfg.copy_mib, settings),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return result.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# Tokenizer: encode, decode, one stage-one training step


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


# ---------------------------------------------------------------------------------------------
# encode.py's per-batch work


def random_clip(node: DictConfig, device: torch.device) -> CLIPEncoder:
    """A randomly initialised CLIP: the small one trained here, or an open_clip architecture."""
    config = instantiate(node, _convert_="all")
    if config.source == "trained":
        model = build_small_clip(config)
        tokenize, embed_dim = clip_tokenizer(config), config.embed_dim
    else:
        with quiet_logging():  # open_clip warns that no pretrained weights were loaded: wanted
            model = open_clip.create_model(config.model_name)
        tokenize = open_clip.get_tokenizer(config.model_name)
        embed_dim = int(open_clip.get_model_config(config.model_name)["embed_dim"])
    return CLIPEncoder(model, tokenize, ImagePreprocess.of(model), config, embed_dim).to(device)


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def encode_section(
    cfg: DictConfig, batches: dict[str, int], settings: Settings, ceiling: float
) -> dict[str, Any]:
    results = {}
    for name, batch_size in batches.items():
        pipeline = cfg.pipelines[name]
        spec = tokenizer_spec(cfg.tokenizers[pipeline.tokenizer])
        vqgan = VQGAN(spec.model).to(settings.device).eval()
        clip = random_clip(cfg.clips[pipeline.clip], settings.device)
        images = random_images(batch_size, spec.model.image_size)
        samples = [Sample(image, CAPTIONS[i % len(CAPTIONS)]) for i, image in enumerate(images)]
        plan = EncodingPlan(
            tokenizer_fingerprint="bench",
            clip_fingerprint="bench",
            num_codes=spec.model.quantizer.num_codes,
            grid_size=spec.model.grid_size,
            image_size=spec.model.image_size,
            embed_dim=clip.embed_dim,
            codes_dtype=codes_dtype(spec.model.quantizer.num_codes),
            embedding_dtype=EMBEDDING_DTYPE,
            shard_size=batch_size,
            batch_size=batch_size,
            data={},
        )
        measurement = measure(
            lambda v=vqgan, c=clip, s=samples, p=plan: encode_batch(v, c, s, p),
            settings,
            with_flops=True,
        )
        results[name] = {
            "tokenizer": pipeline.tokenizer,
            "clip": clip.config.model_name if clip.config.source != "trained" else pipeline.clip,
            "batch_size": batch_size,
            **report(measurement, batch_size, "images", measurement.flops, ceiling),
        }
        progress(f"encode {name}: {per_s(results[name], 'images')}")
    return results


# ---------------------------------------------------------------------------------------------
# Sampling: KV cache against the naive loop, and bf16


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
        m.weight.numel() for m in model.condition_mlp.modules() if isinstance(m, nn.Linear)
    )
    attention = 4 * config.dim * config.num_layers  # per (query, key) pair: q.k and p.v

    def forward(length: int, predicted: int) -> float:
        """A pass over `length` tokens (causal) with the head on the last `predicted`."""
        pairs = length * (length + 1) / 2
        return condition + 2 * blocks * length + attention * pairs + 2 * head * predicted

    prefill = forward(prefix, 1)
    steps = sum(2 * blocks + attention * (prefix + t) + 2 * head for t in range(1, codes))
    naive = sum(forward(prefix + n - 1, n) for n in range(1, codes + 1))
    read = [
        p for name, p in model.named_parameters() if name.startswith(("blocks", "norm", "head"))
    ]
    weight_bytes = sum(p.numel() * p.element_size() for p in read)
    return GPTCost(rows * (prefill + steps), rows * naive, weight_bytes)


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


def ratio(numerator: dict[str, Any], denominator: dict[str, Any]) -> float | None:
    if "skipped" in numerator or "skipped" in denominator:
        return None
    return numerator["tokens_per_s"]["median"] / denominator["tokens_per_s"]["median"]


def generator_config(node: DictConfig, clip_dim: int) -> GPTConfig:
    fields = OmegaConf.to_container(node, resolve=True)
    preset = fields.pop("preset")
    return GPTConfig.preset(preset, clip_dim=clip_dim, **fields)


class Sampler(NamedTuple):
    """What a sampling case runs: the fp32 model, its bf16 copy, and the choices."""

    model: GPT
    bf16_model: GPT
    bf16_mode: str  # auto | true | false
    naive_max_s: float


def streamed_linear_seconds(linear: nn.Linear, rows: int, dtype: torch.dtype) -> float:
    """Median time of `linear` on (rows, in) inputs, cycling through 64 MiB of copies of it
    so that each call reads its weight from memory, as the sampling loop does; with the
    weights packed as sampling packs them."""
    device = linear.weight.device
    count = max(2, 2**26 // (linear.weight.numel() * 4))
    copies = [Linear(linear.in_features, linear.out_features, device=device, dtype=dtype)]
    copies += [copy.deepcopy(copies[0]) for _ in range(count - 1)]
    layout = packing(device, dtype, rows)
    for layer in copies:
        layer.pack(layout, rows)
    x = torch.randn(rows, linear.in_features, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = [timed(lambda layer=layer: layer(x), device) for layer in copies * 2]
    return stats(seconds[count:]).median


def bf16_skip_reason(mode: str, model: GPT, rows: int) -> str | None:
    """None where cached bf16 sampling runs at `rows` rows; otherwise why it is skipped.

    auto, on a CPU: where a bf16 linear of the loop's shape (rows x dim @ dim x 4 dim) is at
    least as fast as fp32. CPUs without native bf16 matrix instructions read half the bytes
    in a matrix-vector product but run products of several rows far slower than fp32."""
    if mode == "false":
        return "bf16=false"
    device = model.head.weight.device
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    if mode == "true":
        return None
    up = model.blocks[0].mlp.up
    fp32 = streamed_linear_seconds(up, rows, torch.float32)
    bf16 = streamed_linear_seconds(up, rows, torch.bfloat16)
    if bf16 <= fp32:
        return None
    return (
        f"a bf16 linear of this loop's shape ({rows} x {up.in_features} @ {up.in_features} x "
        f"{up.out_features}) takes {bf16 * 1e6:.0f} us against {fp32 * 1e6:.0f} us in fp32 "
        "on this CPU; bf16=true runs it anyway"
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

    def run(sample: Callable, gpt: GPT, flops: float, ceiling: float) -> dict[str, Any]:
        measurement = measure(lambda: sample(gpt, embedding, cfg_scale=cfg_scale, seed=0), settings)
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
    return results


def flop_check(model: GPT, settings: Settings) -> float:
    """FlopCounterMode's count of one cached batch-1 generation over the analytic count."""
    embedding = torch.zeros(1, model.config.clip_dim, device=settings.device)
    counted = count_flops(lambda: generate(model, embedding, seed=0))
    return counted / gpt_cost(model, 1).cached_flops


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
        for batch in batch_sizes:
            for scale in cfg.cfg_scales:
                case = f"b{batch}" + ("" if scale == 1.0 else "_cfg")
                cases[case] = figures = sampling_case(sampler, batch, scale, settings, ceilings)
                progress(
                    f"sampling {name} {case}: cached {per_s(figures['cached'], 'tokens')}, "
                    f"naive {per_s(figures['naive'], 'tokens')}, "
                    f"cached bf16 {per_s(figures['cached_bf16'], 'tokens')}"
                )
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


# ---------------------------------------------------------------------------------------------
# The bar


def bar(requirement: str, threshold: float, measured: float | None, where: str) -> dict[str, Any]:
    met = None if measured is None else measured >= threshold
    entry = {"requirement": requirement, "threshold": threshold, "measured": measured, "met": met}
    if measured is None:
        entry["reason"] = f"{where} was not measured in this run"
    return entry


def case_value(sampling: dict, name: str, case: str, *keys: str) -> float | None:
    value: Any = sampling.get(name, {}).get("cases", {}).get(case)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def best_cached(sampling: dict, name: str, case: str, key: str) -> float | None:
    """The higher `key` of the cached loops (fp32, and bf16 where measured) in a case; each
    fraction is against the ceiling of the dtype it runs in and the bytes its weights take."""
    entry = sampling.get(name, {}).get("cases", {}).get(case)
    if entry is None:
        return None
    return max(entry[k][key] for k in ("cached", "cached_bf16") if "skipped" not in entry[k])


def bars(results: dict[str, Any]) -> dict[str, Any]:
    sampling = results.get("sampling", {})
    tokenizers = results.get("tokenizer", {})
    encode_ratios = [t["encode_channels_last_over_contiguous"] for t in tokenizers.values()]
    return {
        "cached_over_naive_256_tokens": bar(
            "KV-cached sampling >= 10x the naive loop, 256 tokens, batch 1, small preset",
            10.0,
            case_value(sampling, "small_256", "b1", "cached_over_naive"),
            "small_256 b1 (cached and naive)",
        ),
        "cached_over_naive_64_tokens": bar(
            "KV-cached sampling >= 3x the naive loop, 64 tokens, batch 1, small preset",
            3.0,
            case_value(sampling, "small_64", "b1", "cached_over_naive"),
            "small_64 b1 (cached and naive)",
        ),
        "reference_batch1_weight_bandwidth": bar(
            "reference size, batch 1: weights read at >= 50% of the copy bandwidth "
            "(the better of the fp32 and bf16 cached loops)",
            0.5,
            best_cached(sampling, "reference", "b1", "weight_read_fraction_of_copy_bandwidth"),
            "reference b1",
        ),
        "reference_batch16_matmul_fraction": bar(
            "reference size, batch 16: >= 30% of the matmul ceiling of its dtype "
            "(the better of the fp32 and bf16 cached loops)",
            0.3,
            best_cached(sampling, "reference", "b16", "fraction_of_matmul_ceiling"),
            "reference b16",
        ),
        "channels_last_encode": bar(
            "tokenizer encode in channels-last at least as fast as the default layout "
            "(the slowest tokenizer's ratio)",
            1.0,
            min(encode_ratios) if encode_ratios else None,
            "tokenizer encode",
        ),
    }


# ---------------------------------------------------------------------------------------------
# A readable summary (printed before the JSON)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def median_of(entry: dict[str, Any], key: str) -> float | None:
    return None if "skipped" in entry else entry[key]["median"]


def summary(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"Machine: {machine['name']} ({machine['device']}, {machine['threads']} threads, "
        f"{machine['cpu_capability']}), torch {machine['torch']}",
        "",
        "| fp32 matmul GFLOP/s | bf16 matmul GFLOP/s | copy GB/s (read + write) |",
        "|---:|---:|---:|",
        f"| {fmt(machine['matmul_float32']['gflops']['median'])} "
        f"| {fmt(machine['matmul_bfloat16']['gflops']['median'])} "
        f"| {fmt(machine['copy']['gbps']['median'])} |",
    ]
    if results.get("tokenizer"):
        lines += [
            "",
            "| tokenizer | batch | encode img/s | encode (channels-last) | decode img/s "
            "| decode (channels-last) | train step img/s | train % of matmul peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in results["tokenizer"].items():
            cells = [
                median_of(t[key], "images_per_s")
                for key in ("encode_contiguous", "encode_channels_last")
                + ("decode_contiguous", "decode_channels_last", "train_step")
            ]
            share = 100 * t["train_step"]["fraction_of_matmul_ceiling"]
            lines.append(
                f"| {name} | {t['batch_size']} | "
                + " | ".join(fmt(c, 2) for c in cells)
                + f" | {fmt(share)} |"
            )
    if results.get("encode"):
        lines += ["", "| encode.py pipeline | batch | images/s |", "|---|---:|---:|"]
        for name, e in results["encode"].items():
            images = fmt(e["images_per_s"]["median"], 2)
            lines.append(
                f"| {name} ({e['tokenizer']} + {e['clip']}) | {e['batch_size']} | {images} |"
            )
    if results.get("sampling"):
        lines += [
            "",
            "| generator | case | cached tok/s | naive tok/s | cached/naive | bf16 cached tok/s "
            "| bf16 cached/naive | cached % of matmul peak | cached weights GB/s (% of copy) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, g in results["sampling"].items():
            for key, case in g["cases"].items():
                cached = case["cached"]
                lines.append(
                    f"| {name} | {key} | {fmt(median_of(cached, 'tokens_per_s'))} "
                    f"| {fmt(median_of(case['naive'], 'tokens_per_s'))} "
                    f"| {fmt(case['cached_over_naive'], 2)} "
                    f"| {fmt(median_of(case['cached_bf16'], 'tokens_per_s'))} "
                    f"| {fmt(case['bf16_cached_over_naive'], 2)} "
                    f"| {fmt(100 * cached['fraction_of_matmul_ceiling'])} "
                    f"| {fmt(cached['weight_read_gbps'])} "
                    f"({fmt(100 * cached['weight_read_fraction_of_copy_bandwidth'], 0)}%) |"
                )
    lines += ["", "| bar | threshold | measured | met |", "|---|---:|---:|---|"]
    for name, entry in results["bars"].items():
        met = {True: "yes", False: "no", None: "not measured"}[entry["met"]]
        lines.append(f"| {name} | {entry['threshold']:g} | {fmt(entry['measured'], 2)} | {met} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point


def selection(cfg: DictConfig) -> DictConfig:
    size_set = "quick" if cfg.quick else cfg.sizes
    if size_set not in cfg.size_sets:
        raise ValueError(f"sizes={size_set!r}: use one of {sorted(cfg.size_sets)}.")
    chosen = cfg.size_sets[size_set]
    unknown = (
        [n for n in chosen.tokenizers if n not in cfg.tokenizers]
        + [n for n in chosen.pipelines if n not in cfg.pipelines]
        + [n for n in chosen.generators if n not in cfg.generators]
    )
    if unknown:
        raise ValueError(
            f"size_sets.{size_set} names {unknown}, which bench.yaml does not define under "
            "tokenizers, pipelines or generators."
        )
    return chosen


def run(cfg: DictConfig) -> dict[str, Any]:
    unknown = sorted(set(cfg.sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"sections has {unknown}: choose from {list(SECTIONS)}.")
    device = resolve_device(cfg.device)
    chosen = selection(cfg)
    settings = Settings(
        device,
        warmup=1 if cfg.quick else cfg.warmup,
        repeats=1 if cfg.quick else cfg.repeats,
        min_repeats=1 if cfg.quick else min(cfg.min_repeats, cfg.repeats),
        budget_s=cfg.budget_s,
    )
    torch.manual_seed(cfg.seed)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    machine = machine_section(cfg, settings)
    ceilings = Ceilings(  # a ceiling is the best the machine did
        machine["matmul_float32"]["gflops"]["max"],
        machine["matmul_bfloat16"]["gflops"]["max"],
        machine["copy"]["gbps"]["max"],
    )
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
    results["bars"] = bars(results)
    results["settings"] = {
        "sizes": "quick" if cfg.quick else cfg.sizes,
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    results = run(cfg)
    text = json.dumps(results, indent=2)
    atomic_write_text(Path(cfg.out), text + "\n")
    print(summary(results))
    print(f"\nWritten to {cfg.out}")
    print(text)


if __name__ == "__main__":
    main()
