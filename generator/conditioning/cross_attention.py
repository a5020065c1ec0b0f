"""Attention from the GPT's tokens (or a resampler's latents) to a condition's token features.

`CrossAttention` splits its work so that sampling computes the condition's keys and values once
per call (`keys_values`) and reuses them at every step (`attend`). `GatedCrossAttention` is
Flamingo's gated xattn-dense block: x + tanh(a) * attention, then x + tanh(b) * feed-forward,
with a = b = 0 at the start, so that inserting it leaves a model's output unchanged until
training opens the gates.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class TokenContext(NamedTuple):
    """A condition's token features in the model's width, with its nulls already applied."""

    features: torch.Tensor  # (B, L, C)
    mask: torch.Tensor  # (B, L) bool, True where attention may look


class CrossKeysValues(NamedTuple):
    keys: torch.Tensor  # (B, heads, L, head_dim)
    values: torch.Tensor  # (B, heads, L, head_dim)
    mask: torch.Tensor  # (B, 1, 1, L) bool


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def keys_values(self, context: TokenContext) -> CrossKeysValues:
        batch_size, length, _ = context.features.shape
        kv = self.key_value(context.features).view(batch_size, length, 2, self.num_heads, -1)
        keys, values = kv.permute(2, 0, 3, 1, 4).unbind()  # (B, heads, L, head_dim) each
        return CrossKeysValues(keys, values, context.mask[:, None, None, :])

    def attend(self, x: torch.Tensor, keys_values: CrossKeysValues) -> torch.Tensor:
        """Queries x (B, n, C) over the context's keys and values; (B, n, C)."""
        batch_size, length, dim = x.shape
        q = self.query(x).view(batch_size, length, self.num_heads, -1).transpose(1, 2)
        keys, values, mask = keys_values
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch_size, length, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class GatedCrossAttention(nn.Module):
    """x + tanh(attention_gate) * attention(norm(x)); then the same with a feed-forward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, num_heads)
        self.attention_gate = nn.Parameter(torch.zeros(()))
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio)
        self.mlp_gate = nn.Parameter(torch.zeros(()))

    def keys_values(self, context: TokenContext) -> CrossKeysValues:
        return self.attention.keys_values(context)

    def forward(self, x: torch.Tensor, keys_values: CrossKeysValues) -> torch.Tensor:
        attended = self.attention.attend(self.attention_norm(x), keys_values)
        x = x + torch.tanh(self.attention_gate) * attended
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class ResamplerLayer(nn.Module):
    """One layer of the Perceiver Resampler: latents attend to the context, then a
    feed-forward, both residual and pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, latents: torch.Tensor, context: TokenContext) -> torch.Tensor:
        keys_values = self.attention.keys_values(context)
        latents = latents + self.attention.attend(self.attention_norm(latents), keys_values)
        return latents + self.mlp(self.mlp_norm(latents))
