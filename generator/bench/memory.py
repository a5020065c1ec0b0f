"""Peak memory of a measurement: the process's peak RSS (VmHWM) and, on CUDA, the max allocated.

VmHWM is reset through /proc/self/clear_refs where Linux allows it; elsewhere the peak is that
of the whole process.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


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
