"""The precision the GPT samples in: fp32, bf16, fp16, or auto, resolved once where a run loads.

The GPT's weights, activations and KV cache take the chosen dtype (the cache takes the model's,
generator/kv_cache.py); guidance mixes the logits, and the softmax and the draw run, in fp32
(generator/next_code_logits.py, generator/sampling.py). The tokenizer and CLIP stay in fp32.
fp32 is the library's default and gives the same codes for a seed as it always did.

`auto`:
- on a CUDA GPU, bf16 where the GPU computes it natively (compute capability 8.0 on; torch
  emulates it on older GPUs), else fp32;
- on a CPU, fp32 unless bf16 is measured at least as fast. The measurement is the benchmark's
  (`bf16_probe`: a bf16 linear of the model's MLP shape against fp32, each streamed from
  memory and multiplied by the product the sampling step uses, generator/cpu_step.py), taken at
  one row and at the rows of a full guided chunk. Where the CPU has no native bf16
  instructions nothing is measured: its products of several rows are emulated (1.4 GFLOP/s
  against 186 in fp32 on the README's CPU), and guidance alone makes every step two rows.

`auto` never picks fp16: its range overflows on activations that bf16 and fp32 hold, and a GPU
fast in fp16 is fast in bf16 too (compute capability 8.0 on), or falls back to fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from generator.cpu_step import MAX_PACKED_ROWS, few_rows_product, median_seconds
from tokenizer.base.hardware import cpu_supports_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = (*DTYPES, "auto")


def check_precision(precision: str) -> str:
    """`precision` where it names one; a ValueError that lists the choices where not."""
    if not isinstance(precision, str) or precision not in CHOICES:
        raise ValueError(
            f"precision must be one of {', '.join(CHOICES)}, got {precision!r}; "
            "auto is bf16 on a GPU that supports it and fp32 on a CPU unless bf16 measures faster."
        )
    return precision


class ProbeTimes(NamedTuple):
    """Median seconds of one product of the probe's shape in each dtype."""

    fp32: float
    bf16: float

    @property
    def bf16_not_slower(self) -> bool:
        return self.bf16 <= self.fp32


def streamed_linear_seconds(linear: nn.Linear, rows: int, dtype: torch.dtype) -> float:
    """Median time of a CPU `linear` on (rows, in) inputs, cycling through 64 MiB of copies of
    it so that each call reads its weight from memory, as the sampling loop does; each copy
    multiplied by the product sampling uses for it at `rows` rows. The first pass over the
    copies warms up; the second is timed."""
    count = max(2, 2**26 // (linear.weight.numel() * 4))
    first = copy.deepcopy(linear).to(dtype)
    copies = [first] + [copy.deepcopy(first) for _ in range(count - 1)]
    products = [few_rows_product(layer, rows) for layer in copies]
    x = torch.randn(rows, linear.in_features, device=linear.weight.device, dtype=dtype)
    with torch.inference_mode():
        return median_seconds([partial(product, x) for product in products * 2], warmup=count)


def bf16_probe(linear: nn.Linear, rows: int) -> ProbeTimes:
    """`linear` at `rows` rows in fp32 and in bf16, as the sampling step runs it."""
    return ProbeTimes(
        streamed_linear_seconds(linear, rows, torch.float32),
        streamed_linear_seconds(linear, rows, torch.bfloat16),
    )


def probe_rows(batch_size: int) -> tuple[int, int]:
    """The step sizes `auto` measures for a pipeline sampling `batch_size` images at once: one
    row, and a full chunk under guidance (two rows an image) up to MAX_PACKED_ROWS, beyond which
    both dtypes run near their matmul ceilings."""
    return 1, min(2 * batch_size, MAX_PACKED_ROWS)


def auto_precision(device: torch.device, bf16_measures_faster: Callable[[], bool]) -> str:
    """What `auto` means on `device` (see the module docstring); `bf16_measures_faster` runs
    only on a CPU with native bf16."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu" and cpu_supports_bf16() and bf16_measures_faster():
        return "bf16"
    return "fp32"


def sampling_precision(precision: str, model: nn.Module, rows: Sequence[int]) -> str:
    """The precision `model` (a GPT, on its device) samples in: `precision` itself, or what
    `auto` measures for steps of each of `rows` rows."""
    if check_precision(precision) != "auto":
        return precision
    up = model.blocks[0].mlp.up

    def bf16_measures_faster() -> bool:
        return all(bf16_probe(up, count).bf16_not_slower for count in rows)

    return auto_precision(model.head.weight.device, bf16_measures_faster)
