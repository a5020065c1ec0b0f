"""The device's own ceilings, measured in the same run as everything else: fp32 and bf16 matmul
GFLOP/s and copy bandwidth (bytes read plus written, STREAM convention); and what the device,
torch and the checkout are."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig

from generator.bench.memory import can_reset_peak_rss
from generator.bench.timing import GB, Settings, measure, rate, timed

ROOT = Path(__file__).resolve().parents[2]


class Ceilings(NamedTuple):
    fp32_gflops: float
    bf16_gflops: float
    copy_gbps: float


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


def ceilings_of(machine: dict[str, Any]) -> Ceilings:
    """A ceiling is the best the machine did."""
    return Ceilings(
        machine["matmul_float32"]["gflops"]["max"],
        machine["matmul_bfloat16"]["gflops"]["max"],
        machine["copy"]["gbps"]["max"],
    )


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
