"""Where the sampler's logits come from: the logits of the next code for the caller's B images,
guidance applied, in fp32 whatever the model's precision.

- `CachedLogits`: the prefix once, then one code per step against a preallocated KV cache,
  through `OneCodeStep` (generator/cpu_step.py), eagerly;
- `GraphedLogits`: the same on a GPU, each step one replay of a CUDA graph that feeds the
  codes, runs the model and mixes the logits (generator/cuda_graph_step.py);
- `RecomputedLogits`: the naive baseline, a full forward pass for every code.

Guidance runs the conditional and unconditional halves as one batch of 2B rows and mixes them
as `uncond + cfg_scale * (cond - uncond)`, in fp32: in bf16 the difference of two nearly equal
logits would keep about two significant digits.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch

from generator.conditioning.condition import Condition, as_condition
from generator.cpu_step import OneCodeStep
from generator.cuda_graph_step import (
    CapturedStep,
    GraphCaptureWarning,
    PositionedStep,
    graph_skip_reason,
)
from generator.gpt import GPT


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Mix the conditional and unconditional halves of logits (2B, vocab) into (B, vocab)."""
    conditional, unconditional = logits.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)


class NextCodeLogits(ABC):
    """Logits (B, vocab) in fp32 of the next code for the caller's B images, guidance applied.

    Under guidance the model sees 2B rows: the conditional batch, then its unconditional copy.
    `prefix_codes` (B, K) are codes already chosen, fed before the first code to sample.
    """

    def __init__(
        self,
        model: GPT,
        condition: Condition | torch.Tensor,
        cfg_scale: float = 1.0,
        prefix_codes: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.cfg_scale = cfg_scale
        self.guided = cfg_scale != 1.0
        condition = as_condition(condition)
        self.condition = condition.guided() if self.guided else condition
        self.rows = self.condition.batch_size  # B, or 2B under guidance
        self.prefix_codes = None
        if prefix_codes is not None and prefix_codes.shape[1]:
            self.prefix_codes = self._both_halves(prefix_codes)  # (B', K)
        self.prepare()

    @abstractmethod
    def prepare(self) -> None:
        """Allocate what the steps reuse."""

    @abstractmethod
    def start(self) -> torch.Tensor:
        """Logits (B, vocab) of the first code to sample."""

    @abstractmethod
    def advance(self, codes: torch.Tensor) -> torch.Tensor:
        """Take the codes (B,) just sampled; return the logits (B, vocab) of the next ones."""

    def _both_halves(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([codes, codes]) if self.guided else codes

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # fp32 logits are returned as they are
        return guide(logits, self.cfg_scale) if self.guided else logits


class CachedLogits(NextCodeLogits):
    """Runs the prefix (and any given codes) once, then one code per step against a KV cache,
    through a `OneCodeStep` built for this call's rows (the model must stay in eval mode)."""

    def prepare(self) -> None:
        self.cache = self.model.new_cache(self.rows)
        self.one_code_step = OneCodeStep(self.model, self.rows)

    def start(self) -> torch.Tensor:
        logits = self.model.prefill(self.condition, self.cache, self.prefix_codes)
        return self._mix(logits)

    def advance(self, codes: torch.Tensor) -> torch.Tensor:
        return self._mix(self.one_code_step(self._both_halves(codes), self.cache))


class GraphedLogits(CachedLogits):
    """CachedLogits whose steps replay a CUDA graph captured at the first; where the capture
    fails, a `GraphCaptureWarning` and CachedLogits' eager steps for the rest of the call.

    Each step sets the new token's slot, then replays: the graph copies nothing back, so the
    loop never waits for the GPU. The logits it returns are overwritten by the next step."""

    def prepare(self) -> None:
        super().prepare()
        self.positioned_step = PositionedStep(self.model, self.cache)
        self.captured: CapturedStep | None = None
        self.eager = False

    def advance(self, codes: torch.Tensor) -> torch.Tensor:
        if self.eager:
            return super().advance(codes)
        self.cache.check_room(1)
        self.positioned_step.slot.fill_(self.cache.length)
        if self.captured is None:
            try:
                self.captured = CapturedStep(self._step, codes)
            except RuntimeError as error:
                warnings.warn(
                    f"Could not capture a CUDA graph of the sampling step ({error}); this call "
                    "samples eagerly. Pass cuda_graph=False to skip the attempt.",
                    GraphCaptureWarning,
                    stacklevel=2,
                )
                self.eager = True
                return super().advance(codes)
        logits = self.captured(codes)
        self.cache.advance(1)
        return logits

    def _step(self, codes: torch.Tensor) -> torch.Tensor:
        """What the graph records: codes (B,) to the mixed fp32 logits (B, vocab)."""
        return self._mix(self.positioned_step(self._both_halves(codes)))


class RecomputedLogits(NextCodeLogits):
    """The naive baseline: a full forward pass over every code so far, for every new code."""

    def prepare(self) -> None:
        self.codes = torch.zeros(  # (B', T); the slot after the last code is a placeholder
            self.rows,
            self.model.config.num_codes,
            dtype=torch.long,
            device=self.model.head.weight.device,
        )
        self.length = 0
        if self.prefix_codes is not None:
            self.length = self.prefix_codes.shape[1]
            self.codes[:, : self.length] = self.prefix_codes

    def start(self) -> torch.Tensor:
        return self._next_logits()

    def advance(self, codes: torch.Tensor) -> torch.Tensor:
        self.codes[:, self.length] = self._both_halves(codes)
        self.length += 1
        return self._next_logits()

    def _next_logits(self) -> torch.Tensor:
        # forward never reads its last code, so the placeholder only sets where logits end
        logits = self.model(self.codes[:, : self.length + 1], self.condition)
        return self._mix(logits[:, -1])


def cached_logits_class(model: GPT, cuda_graph: bool) -> type[CachedLogits]:
    """GraphedLogits where a CUDA graph applies to `model` (see graph_skip_reason), else
    CachedLogits."""
    skip = graph_skip_reason(model.head.weight.device, cuda_graph)
    return CachedLogits if skip is not None else GraphedLogits
