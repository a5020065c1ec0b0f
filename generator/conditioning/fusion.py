"""How a condition reaches the GPT: the fusion mechanisms and the learnt null of every input.

    pooled     the pooled CLIP embedding through a small MLP -> P prefix tokens (DALL·E-style;
               the only input this mechanism reads)
    early      as pooled, plus the CLIP text token features through an MLP connector, one
               prefix token each (LLaVA's connector, LlamaGen's text-conditioned prefix)
    resampler  as pooled, plus K learnt latents that cross-attend to the token features and
               become K prefix tokens (Flamingo's Perceiver Resampler)
    deep       as pooled, and gated cross-attention to the token features between the GPT's
               blocks (Flamingo's gated xattn-dense; the GPT holds those blocks)

Every input has a learnt null: the pooled embedding a vector, the token features a sequence of
L vectors. `Condition.drop` replaces all of them (classifier-free guidance), `drop_tokens` the
token features alone; a condition without token features reads their null. Padding positions
(mask False) read a learnt pad vector in the prefix and are masked out of every cross-attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import nn

from generator.conditioning.condition import Condition
from generator.conditioning.cross_attention import ResamplerLayer, TokenContext

if TYPE_CHECKING:
    from generator.gpt import GPTConfig

FUSIONS = ("pooled", "early", "resampler", "deep")
RESAMPLER_LAYERS = 2


def extra_prefix_tokens(fusion: str, num_condition_tokens: int, num_latents: int) -> int:
    """Prefix tokens a fusion adds to the pooled embedding's P."""
    return {"early": num_condition_tokens, "resampler": num_latents}.get(fusion, 0)


class Conditioner(nn.Module):
    """Turns a Condition into what the GPT reads: prefix tokens, and token context for deep
    fusion's cross-attention. Owns every conditioning parameter, nulls included."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fusion = config.fusion
        self.num_prefix_tokens = config.num_prefix_tokens
        dim = config.dim
        self.null_embedding = nn.Parameter(torch.empty(config.clip_dim))
        self.condition_mlp = nn.Sequential(
            nn.Linear(config.clip_dim, dim),
            nn.GELU(),
            nn.Linear(dim, config.num_prefix_tokens * dim),
        )
        self.prefix_position = nn.Parameter(torch.empty(config.num_prefix_tokens, dim))
        if self.fusion == "pooled":
            return
        length, width = config.num_condition_tokens, config.token_dim
        self.null_tokens = nn.Parameter(torch.empty(length, width))
        self.connector = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))
        if self.fusion == "early":
            self.token_position = nn.Parameter(torch.empty(length, dim))
            self.pad = nn.Parameter(torch.empty(dim))
        if self.fusion == "resampler":
            self.latents = nn.Parameter(torch.empty(config.num_latents, dim))
            self.resampler = nn.ModuleList(
                ResamplerLayer(dim, config.num_heads, config.mlp_ratio)
                for _ in range(RESAMPLER_LAYERS)
            )
            self.latent_norm = nn.LayerNorm(dim)

    def reset_parameters(self, clip_dim: int) -> None:
        """Positions, latents and pads normal(0, 0.02); nulls about as large as their inputs:
        CLIP embeddings are unit vectors, token features come out of a layer norm."""
        for name in ("prefix_position", "token_position", "pad", "latents"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        nn.init.normal_(self.null_embedding, std=clip_dim**-0.5)
        if hasattr(self, "null_tokens"):
            nn.init.normal_(self.null_tokens, std=1.0)

    @property
    def needs_tokens(self) -> bool:
        return self.fusion != "pooled"

    def prefix(self, condition: Condition) -> torch.Tensor:
        """The prefix tokens of a condition; (B, P'), P' = P plus what the fusion adds."""
        pooled = condition.pooled
        if condition.drop is not None:
            pooled = torch.where(condition.drop[:, None], self.null_embedding, pooled)
        prefix = rearrange(self.condition_mlp(pooled), "b (p c) -> b p c", p=self.num_prefix_tokens)
        prefix = prefix + self.prefix_position  # (B, P, C)
        if self.fusion == "early":
            features, mask = self.context(condition)
            tokens = torch.where(mask[..., None], features + self.token_position, self.pad)
            prefix = torch.cat([prefix, tokens], dim=1)  # (B, P + L, C)
        elif self.fusion == "resampler":
            context = self.context(condition)
            latents = self.latents.expand(condition.batch_size, -1, -1)
            for layer in self.resampler:
                latents = layer(latents, context)
            prefix = torch.cat([prefix, self.latent_norm(latents)], dim=1)  # (B, P + K, C)
        return prefix

    def context(self, condition: Condition) -> TokenContext:
        """The token features through the connector, nulls applied; (B, L, C) and their mask."""
        tokens, mask = self._tokens_with_nulls(condition)
        return TokenContext(self.connector(tokens), mask)

    def _tokens_with_nulls(self, condition: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size = condition.batch_size
        null = self.null_tokens.expand(batch_size, -1, -1)  # (B, L, W)
        every = torch.ones(null.shape[:2], dtype=torch.bool, device=null.device)
        if condition.tokens is None:
            return null, every
        dropped = [d for d in (condition.drop, condition.drop_tokens) if d is not None]
        tokens, mask = condition.tokens, condition.mask
        if dropped:
            replace = torch.stack(dropped).any(dim=0)[:, None]  # (B, 1)
            tokens = torch.where(replace[..., None], null, tokens)
            mask = mask | replace
        return tokens, mask
