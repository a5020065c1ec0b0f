"""FLOPs of one run, counted by torch's FlopCounterMode, CPU attention included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


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
