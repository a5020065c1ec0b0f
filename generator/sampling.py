"""Sampling codes from the GPT: temperature, top-k, top-p and classifier-free guidance.

`generate` keeps a preallocated KV cache and feeds one code per step (on a GPU, each step one
replay of a CUDA graph); `generate_naive` re-runs the full forward pass for every code and is
the baseline that tests and benchmarks compare against. Both share everything else (guidance,
filtering, the random draws), so for the same seed they return the same codes. Where the
logits come from: generator/next_code_logits.py.

The model samples in its own dtype (fp32, bf16 or fp16: generator/precision.py), its KV cache
too; guidance, the softmax and the draw run in fp32.

Guidance runs the conditional and unconditional halves as one batch of 2B and mixes them as
`uncond + cfg_scale * (cond - uncond)`: cfg_scale = 1 is the plain conditional model (and runs
only the conditional half), 0 ignores the condition, larger values follow it more strongly.
Negative scales are refused: they steer away from the prompt, which is never what a user of
text-to-image or variations wants.

Codes are drawn by inverting the cumulative distribution: the first code whose cumulative
probability exceeds a uniform draw. It samples softmax(logits) exactly, needs one random number
per row, and never synchronises host and device inside the loop. (The Gumbel-max trick needs
one per code: on a CPU, drawing 16 x 16,384 of them took 7x as long as this whole draw.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from generator.conditioning.condition import Condition, as_condition, check_condition
from generator.gpt import GPT
from generator.next_code_logits import (
    CachedLogits,
    RecomputedLogits,
    cached_logits_class,
)


@dataclass(frozen=True)
class SamplingOptions:
    """How codes are drawn; every sampling entry point takes one (see the module docstring).

    The defaults draw from the plain conditional model; the pipeline's defaults add guidance.
    """

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely codes; None keeps every code
    top_p: float | None = None  # keep the nucleus of this mass; None keeps every code
    cfg_scale: float = 1.0  # 1: no guidance, 0: unconditional, larger: follow the condition
    seed: int | None = None
    rerank: int = 0  # the pipeline's: candidates per image, the best by CLIP kept; 0 or 1: none
    cuda_graph: bool = True  # on a GPU, replay each step as a CUDA graph; False: eager steps

    @property
    def candidates(self) -> int:
        return max(self.rerank, 1)

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], defaults: SamplingOptions | None = None
    ) -> SamplingOptions:
        """`defaults` with the options a config (any mapping) sets; other keys are ignored."""
        given = {f.name: settings[f.name] for f in fields(cls) if f.name in settings}
        return replace(defaults or cls(), **given)

    def check(self, vocab_size: int) -> None:
        """Raise a ValueError that says what to do for any option sampling cannot use."""
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a positive number, got {self.temperature}; "
                "use top_k=1 for greedy decoding."
            )
        if self.top_k is not None and not (_is_int(self.top_k) and 1 <= self.top_k <= vocab_size):
            raise ValueError(
                f"top_k must be an integer from 1 to the vocabulary size {vocab_size}, got "
                f"{self.top_k!r}; pass top_k=None to keep every code."
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(
                f"top_p must be in (0, 1], got {self.top_p}; pass top_p=None to keep the whole "
                "distribution."
            )
        if not (_is_number(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(
                f"cfg_scale must be a number >= 0, got {self.cfg_scale}; use 1 for no guidance, "
                "0 to ignore the condition, and about 1.5 to 5 to follow it more closely."
            )
        if not (_is_int(self.rerank) and self.rerank >= 0):
            raise ValueError(f"rerank must be an integer of at least 0, got {self.rerank!r}.")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}.")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"cuda_graph must be true or false, got {self.cuda_graph!r}.")


PLAIN = SamplingOptions()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def filter_logits(
    logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set logits (..., vocab) outside the top k and outside the nucleus of mass top_p to -inf.

    The nucleus is the smallest set of most likely codes whose probability reaches top_p.
    """
    if top_k is not None:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # 0 for the most likely code
        outside_sorted = mass_before >= top_p
        outside = torch.zeros_like(outside_sorted).scatter(-1, order, outside_sorted)
        logits = logits.masked_fill(outside, -math.inf)
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    options: SamplingOptions = PLAIN,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one code per row of logits (B, vocab) after temperature and filtering; (B,) long."""
    logits = logits.float()
    if options.temperature != 1.0:
        logits = logits / options.temperature
    logits = filter_logits(logits, top_k=options.top_k, top_p=options.top_p)
    cumulative = logits.softmax(dim=-1).cumsum_(dim=-1)  # (B, vocab)
    total = cumulative[:, -1:]  # 1 up to rounding
    # A filtered code adds 0, so the first sum above the draw is never one. Rounding can lift
    # U * total to the total, where no sum lies above; shrunk by one part in 2^23, which is at
    # least one step of fp32 below any total, the draw stays below it.
    draw = torch.rand(total.shape, generator=generator, device=logits.device)
    draw = draw.mul_(total).mul_(1 - 2**-23)
    return torch.searchsorted(cumulative, draw, right=True).squeeze(-1)


def generate(
    model: GPT,
    condition: Condition | torch.Tensor,
    options: SamplingOptions = PLAIN,
    *,
    prefix_codes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sample codes (B, T) for a condition of B rows (or bare CLIP embeddings (B, E)), with
    the KV cache.

    prefix_codes (B, K) are kept as the first K codes (e.g. the top rows of an image, for
    variations) and the rest is sampled. Set `options.seed`, or pass a `torch.Generator` on
    the model's device, for reproducible samples; with neither, torch's global generator is
    used. `options.rerank` is the pipeline's and is not read here. The model runs in eval mode
    and is put back in its previous mode afterwards. It samples in its own dtype (cast it, or
    load the pipeline with a precision, to sample in bf16 or fp16); on a GPU each step replays
    a CUDA graph captured for this call unless `options.cuda_graph` is False. `on_step(done,
    total)` is called after each code with the codes sampled so far and the number to sample;
    an exception it raises stops the loop there and reaches the caller (how an app shows
    progress and stops).
    """
    return _generate(
        cached_logits_class(model, options.cuda_graph),
        model,
        condition,
        options,
        prefix_codes=prefix_codes,
        generator=generator,
        on_step=on_step,
    )


def generate_naive(
    model: GPT, condition: Condition | torch.Tensor, options: SamplingOptions = PLAIN, **inputs: Any
) -> torch.Tensor:
    """`generate` without the KV cache, taking the same `prefix_codes` and `generator`: the
    baseline it must match, code for code."""
    return _generate(RecomputedLogits, model, condition, options, **inputs)


@torch.inference_mode()
def _generate(
    logits_source: type[CachedLogits] | type[RecomputedLogits],
    model: GPT,
    condition: Condition | torch.Tensor,
    options: SamplingOptions,
    *,
    prefix_codes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    options.check(model.config.vocab_size)
    condition = as_condition(condition)
    check_inputs(model, condition, prefix_codes, generator, options.seed)
    weight = model.head.weight
    condition = condition.to(weight.device, weight.dtype)
    batch_size, num_codes = condition.batch_size, model.config.num_codes
    codes = torch.empty(batch_size, num_codes, dtype=torch.long, device=weight.device)
    num_given = 0
    if prefix_codes is not None:
        num_given = prefix_codes.shape[1]
        prefix_codes = prefix_codes.to(codes)
        codes[:, :num_given] = prefix_codes
    if num_given == num_codes:
        return codes
    if options.seed is not None:
        generator = torch.Generator(weight.device).manual_seed(options.seed)

    with _eval_mode(model):
        source = logits_source(model, condition, options.cfg_scale, prefix_codes)
        logits = source.start()  # (B, vocab)
        for t in range(num_given, num_codes):
            codes[:, t] = sample_from_logits(logits, options, generator)
            if on_step is not None:
                on_step(t + 1 - num_given, num_codes - num_given)
            if t + 1 < num_codes:
                logits = source.advance(codes[:, t])
    return codes


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_inputs(
    model: GPT,
    condition: Condition,
    prefix_codes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> None:
    """Raise a ValueError that says what to do for an input `generate` cannot use."""
    config, clip_embedding = model.config, condition.pooled
    if clip_embedding.ndim != 2 or clip_embedding.shape[1] != config.clip_dim:
        raise ValueError(
            f"clip_embedding must have shape (batch, {config.clip_dim}), got "
            f"{tuple(clip_embedding.shape)}; pass one embedding per image to generate "
            "(embedding[None] for a single one)."
        )
    if clip_embedding.shape[0] == 0:
        raise ValueError("clip_embedding is an empty batch; pass at least one embedding.")
    check_condition(condition, clip_embedding.shape[0], config)
    if prefix_codes is not None:
        _check_prefix_codes(
            prefix_codes, clip_embedding.shape[0], config.num_codes, config.vocab_size
        )
    if generator is not None and seed is not None:
        raise ValueError("Pass either seed or generator to generate, not both.")
    device = model.head.weight.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"The generator is on {generator.device} but the model is on {device}; "
            f"create it with torch.Generator({str(device)!r})."
        )


def _check_prefix_codes(
    prefix_codes: torch.Tensor, batch_size: int, num_codes: int, vocab_size: int
) -> None:
    if prefix_codes.ndim != 2 or prefix_codes.shape[0] != batch_size:
        raise ValueError(
            f"prefix_codes must have shape ({batch_size}, K), one row per embedding, got "
            f"{tuple(prefix_codes.shape)}; flatten the kept rows of the (h, w) grid in raster order."
        )
    if prefix_codes.shape[1] > num_codes:
        raise ValueError(
            f"prefix_codes has {prefix_codes.shape[1]} codes but an image has only {num_codes}."
        )
    if prefix_codes.dtype.is_floating_point or prefix_codes.dtype.is_complex:
        raise ValueError(f"prefix_codes must hold integer codes, got dtype {prefix_codes.dtype}.")
    if prefix_codes.numel() and (prefix_codes.min() < 0 or prefix_codes.max() >= vocab_size):
        raise ValueError(
            f"prefix_codes must lie in [0, {vocab_size}), the tokenizer's codebook; "
            "encode them with the same tokenizer the generator was trained on."
        )
