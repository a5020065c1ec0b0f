"""What a generator is conditioned on, as one value: `Condition`, and the guided batch of it.

A condition holds every conditioning input the generator may read: the pooled CLIP embedding
(always) and, for the fusion mechanisms that read them, CLIP's per-token text features with
their mask. Two masks say where inputs are replaced by their learnt nulls: `drop` replaces all
of them (the unconditional model of classifier-free guidance), `drop_tokens` the token features
alone (a condition known only by its pooled embedding, such as an image's for variations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from generator.gpt import GPTConfig


class Condition(NamedTuple):
    pooled: torch.Tensor  # (B, E) CLIP embeddings
    tokens: torch.Tensor | None = None  # (B, L, W) CLIP text token features
    mask: torch.Tensor | None = None  # (B, L) bool, True at real tokens
    drop: torch.Tensor | None = None  # (B,) bool: every input replaced by its null
    drop_tokens: torch.Tensor | None = None  # (B,) bool: the token features replaced by theirs

    @property
    def batch_size(self) -> int:
        return self.pooled.shape[0]

    def map(self, change) -> Condition:
        """The condition with `change` applied to each tensor it holds."""
        return Condition(*(None if value is None else change(value) for value in self))

    def to(self, device: torch.device, dtype: torch.dtype) -> Condition:
        """On `device`, its float tensors in `dtype`."""
        return self.map(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))

    def repeat_interleave(self, repeats: int) -> Condition:
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def rows(self, index: slice | torch.Tensor) -> Condition:
        return self.map(lambda t: t[index])

    def guided(self) -> Condition:
        """The batch classifier-free guidance runs: the condition, then its unconditional copy
        (every input dropped); (2B, ...)."""
        keep = torch.zeros(self.batch_size, dtype=torch.bool, device=self.pooled.device)
        doubled = self.map(lambda t: torch.cat([t, t]))
        drop = torch.cat([keep if self.drop is None else self.drop, ~keep])
        return doubled._replace(drop=drop)


class DistinctRows(NamedTuple):
    first: torch.Tensor  # (D,) long: a row of the batch holding each distinct row
    inverse: torch.Tensor  # (B,) long: which distinct row each row of the batch is


def distinct_rows(condition: Condition, codes: torch.Tensor | None = None) -> DistinctRows:
    """The distinct rows of a condition, and of codes (B, n) given with it, as the generator
    reads them: an input a row drops reads its null, so rows that drop it are alike whatever
    they hold there (the whole unconditional half of a guided batch is one row)."""
    batch_size = condition.batch_size
    no = torch.zeros(batch_size, dtype=torch.bool, device=condition.pooled.device)
    drop = no if condition.drop is None else condition.drop
    drop_tokens = drop | (no if condition.drop_tokens is None else condition.drop_tokens)
    parts = [condition.pooled.masked_fill(drop[:, None], 0), drop[:, None], drop_tokens[:, None]]
    if condition.tokens is not None:  # what padding holds is never read either
        read = condition.mask & ~drop_tokens[:, None]  # (B, L)
        parts += [condition.tokens.masked_fill(~read[..., None], 0).flatten(1), read]
    if codes is not None:
        parts.append(codes)
    rows = torch.cat([part.float() for part in parts], dim=1)  # every value exact in fp32
    distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((len(distinct),), batch_size, device=inverse.device)
    order = torch.arange(batch_size, device=inverse.device)
    return DistinctRows(first.scatter_reduce_(0, inverse, order, "amin"), inverse)


def as_condition(condition: Condition | torch.Tensor) -> Condition:
    """A Condition from a Condition or a bare pooled embedding (B, E)."""
    return condition if isinstance(condition, Condition) else Condition(condition)


def check_condition(condition: Condition, batch_size: int, config: GPTConfig) -> None:
    """Raise a ValueError naming the input whose shape does not fit the model or the batch."""
    expected = {  # the pooled embedding is the CLIP embedding of the older API
        "pooled": (batch_size, config.clip_dim),
        "tokens": (batch_size, config.num_condition_tokens, config.token_dim),
        "mask": (batch_size, config.num_condition_tokens),
        "drop": (batch_size,),
        "drop_tokens": (batch_size,),
    }
    if config.fusion == "pooled":  # it never reads token features
        condition = condition._replace(tokens=None, mask=None)
    for name, value in condition._asdict().items():
        if value is not None and tuple(value.shape) != expected[name]:
            shown = "clip_embedding" if name == "pooled" else f"the condition's {name}"
            raise ValueError(
                f"{shown} must have shape {expected[name]} for this generator "
                f"and a batch of {batch_size}, got {tuple(value.shape)}."
            )
    if (condition.tokens is None) != (condition.mask is None):
        raise ValueError("the condition's tokens and mask come together: pass both or neither.")
