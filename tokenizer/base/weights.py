"""Exported weights into the model a config.json describes, with memory bounded by the file.

A run directory may come from anywhere, and its config.json decides how large a model gets
built: `num_codes=10**9` or `base_channels=10**6` would allocate gigabytes before any check of
the weights could refuse them. `load_checked_model` therefore

  1. reads the names, shapes and dtypes of the safetensors file from its header (no data),
  2. builds the model on the meta device (no memory), stopping it as soon as it registers
     more tensors or bytes than the file holds (so no loop or table of a crafted size runs),
  3. refuses any tensor that is missing, extra, or of another shape or dtype, and
  4. only then builds the model for real and loads the file into it.

Building for real (rather than materialising the meta model) keeps the buffers that are not
saved, such as attention masks, as the model's constructor computes them. Nothing here
unpickles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from tokenizer.base.files import atomic_write_bytes

M = TypeVar("M", bound=nn.Module)


class ModelTooLargeError(ValueError):
    """A model being built registered more tensors or bytes than it was allowed."""


# What a model may hold beyond its saved tensors: buffers it does not save (masks, windows
# of recent codes) and tensors registered twice under one name.
UNSAVED_TENSORS = 256
UNSAVED_BYTES = 64 * 2**20

# The dtypes of safetensors headers, by the names the format gives them.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def saved_tensors(weights: Path, fix: str) -> dict[str, torch.Tensor]:
    """Each tensor of a safetensors file as an empty meta tensor of its shape and dtype."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            names = file.keys()  # a safetensors file is not iterable
            slices = {name: file.get_slice(name) for name in names}
            shapes = {name: (part.get_shape(), part.get_dtype()) for name, part in slices.items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error}): {fix}") from None
    unknown = sorted(name for name, (_, dtype) in shapes.items() if dtype not in DTYPES)
    if unknown:
        raise ValueError(f"{weights} stores {unknown[:3]} in a dtype no model here uses: {fix}")
    return {
        name: torch.empty(shape, dtype=DTYPES[dtype], device="meta")
        for name, (shape, dtype) in shapes.items()
    }


def save_weights(model: nn.Module, path: Path) -> Path:
    """The model's state dict as safetensors at `path`. Serialised in memory and written with
    atomic_write, so that a full disk is its WriteError, never half a file."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    return atomic_write_bytes(path, safetensors.torch.save(tensors))


def mismatched_tensors(state: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Names of tensors missing on either side or of another shape, sorted: what makes a
    weights file and a config (or a checkpoint and a model) not belong together."""
    return sorted(
        name
        for name in set(state) | set(expected)
        if name not in state or name not in expected or state[name].shape != expected[name].shape
    )


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@contextlib.contextmanager
def registration_limit(max_tensors: int, max_bytes: int) -> Iterator[None]:
    """Raise ModelTooLargeError once the modules built inside this block register more than
    `max_tensors` parameters and buffers, or more than `max_bytes` of them.

    The hooks are global while the block runs: build nothing else in another thread meanwhile.
    """
    tensors, total = 0, 0

    def count(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        nonlocal tensors, total
        if tensor is None:
            return
        tensors, total = tensors + 1, total + nbytes(tensor)
        if tensors > max_tensors or total > max_bytes:
            raise ModelTooLargeError(
                f"the model it describes outgrows the file ({tensors} tensors of "
                f"{total / 2**20:.1f} MiB so far, where the file allows {max_tensors} tensors "
                f"of {max_bytes / 2**20:.1f} MiB)"
            )

    handles = [
        register_module_parameter_registration_hook(count),
        register_module_buffer_registration_hook(count),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_checked_model(
    build: Callable[[], M],
    weights: Path,
    config: Path,
    fix: str,
    renamed: Callable[[str], str] = lambda name: name,
) -> M:
    """`build()` (a model of the config in `config`) holding the weights in `weights`, on the
    CPU; a ValueError naming both files and ending with `fix` when they do not belong together.
    Peak memory is bounded by the size of `weights`, whatever `config` says. `renamed` maps a
    tensor's name in files written before a rename to its name in the model."""
    saved = {renamed(name): tensor for name, tensor in saved_tensors(weights, fix).items()}
    refusal = f"{weights} does not match {config}"
    limit = registration_limit(
        len(saved) + UNSAVED_TENSORS, sum(map(nbytes, saved.values())) + UNSAVED_BYTES
    )
    try:
        with limit, torch.device("meta"):
            expected = build().state_dict()
    except ModelTooLargeError as error:
        raise ValueError(f"{refusal}: {error}; {fix}") from None
    except (RuntimeError, OverflowError) as error:
        raise ValueError(f"{refusal}: its model cannot be built ({error}); {fix}") from None
    wrong = mismatched_tensors(saved, expected) or sorted(
        name for name in saved if saved[name].dtype != expected[name].dtype
    )
    if wrong:
        raise ValueError(f"{refusal} (tensors {wrong[:3]} differ): {fix}")
    model = build()
    state = {renamed(name): tensor for name, tensor in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True)
    return model
