"""Timing a run: the settings of every measurement, warm-up and timed repeats, their median,
min and max, and a measurement as JSON with its rate and its fraction of the matmul ceiling.

A measurement whose warm-up exceeds `budget_s` gets fewer repeats (at least `min_repeats`),
never less work per run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from generator.bench.flops import count_flops
from generator.bench.memory import cuda_peak_mb, current_rss_mb, peak_rss_mb, reset_peak_memory

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Settings:
    device: torch.device
    warmup: int
    repeats: int
    min_repeats: int
    budget_s: float


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


def timed(run: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


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
