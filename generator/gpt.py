"""A decoder-only transformer that writes a tokenizer's codes, conditioned on a CLIP embedding.

The sequence the transformer reads is

    [prefix_0 .. prefix_{P-1}, code_0, code_1, .., code_{T-2}]

where the P prefix tokens come from the CLIP embedding through a small MLP, and the T = h * w
codes are the tokenizer's grid in raster order. The output at each position predicts the next
code: the last prefix token predicts code_0, code_0 predicts code_1, and so on, so a full pass
gives logits for all T codes.

Classifier-free guidance needs an unconditional model too: a trained null embedding takes the
place of the CLIP embedding wherever `drop_condition` says so (with probability `p_uncond` in
training, for the whole unconditional half of the batch when sampling).

Sampling runs the prefix once (`prefill`) and then one code at a time (`step`) against a
preallocated `KVCache` (generator/kv_cache.py); `forward` is the full pass used for training
and as the reference. The sampler's fast one-code step lives apart, in generator/cpu_step.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from generator.kv_cache import KVCache
from tokenizer.base.configs import checked_config

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "small": {"dim": 384, "num_layers": 8, "num_heads": 6},
    "base": {"dim": 768, "num_layers": 12, "num_heads": 12},
    "large": {"dim": 1024, "num_layers": 24, "num_heads": 16},
}


@checked_config("generator")
@dataclass
class GPTConfig:
    # Sizes owned by other components, interpolated from their configs, so they have no default.
    vocab_size: int  # the tokenizer's codebook size
    grid_size: tuple[int, int]  # (h, w) of the tokenizer's code grid
    clip_dim: int  # width of the CLIP embedding
    # The transformer's own sizes; the defaults are the "small" preset.
    num_prefix_tokens: int = 4  # tokens the CLIP embedding is mapped to
    dim: int = 384
    num_layers: int = 8
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    p_uncond: float = 0.1  # probability, in training, of replacing the condition by the null

    def __post_init__(self) -> None:
        sizes = {
            "vocab_size": self.vocab_size,
            "clip_dim": self.clip_dim,
            "num_prefix_tokens": self.num_prefix_tokens,
            "dim": self.dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"generator.{name} must be at least 1, got {value}.")
        if len(self.grid_size) != 2 or min(self.grid_size) < 1:
            raise ValueError(
                f"generator.grid_size must be (h, w) with both at least 1, got {self.grid_size}; "
                "take it from the tokenizer config."
            )
        if self.dim % self.num_heads:
            raise ValueError(
                f"generator.dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                "choose a dim that is a multiple of num_heads."
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"generator.mlp_ratio must be positive, got {self.mlp_ratio}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"generator.dropout must be in [0, 1), got {self.dropout}.")
        if not 0 <= self.p_uncond <= 1:
            raise ValueError(
                f"generator.p_uncond must be in [0, 1], got {self.p_uncond}; "
                "0.1 is a usual choice for classifier-free guidance."
            )

    @classmethod
    def preset(
        cls,
        name: str,
        *,
        vocab_size: int,
        grid_size: tuple[int, int],
        clip_dim: int,
        **overrides: Any,
    ) -> GPTConfig:
        """A named size (`tiny`, `small`, `base`, `large`); keyword arguments override any field."""
        if name not in PRESETS:
            raise ValueError(f"Unknown generator preset {name!r}; choose one of {sorted(PRESETS)}.")
        fields = {**PRESETS[name], **overrides}
        return cls(vocab_size=vocab_size, grid_size=grid_size, clip_dim=clip_dim, **fields)

    @property
    def num_codes(self) -> int:
        """Codes per image, T = h * w."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def max_len(self) -> int:
        """Tokens the transformer ever reads: the prefix and every code but the last."""
        return self.num_prefix_tokens + self.num_codes - 1


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention of the n newest queries over all keys; (B, heads, n, head_dim)."""
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    if num_queries == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if num_queries == 1:  # the newest token may see every cached one
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # New queries start after num_cached keys; is_causal would align them to the first key.
    num_cached = num_keys - num_queries
    mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.tril(diagonal=num_cached), dropout_p=dropout_p
    )


class Dropout(nn.Dropout):
    """nn.Dropout that hands back its input outside training without a call into torch, which
    costs a few microseconds each time: sampling passes 2 L + 1 of them for every code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.training and self.p > 0 else x


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)  # residual projection
        self.out_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        batch_size, length, dim = x.shape
        qkv = self.qkv(x).view(batch_size, length, 3, self.num_heads, -1)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, T, head_dim)
        q, keys_values = qkv[0], qkv[1:]
        if cache is None:
            k, v = keys_values.unbind()
        else:
            k, v = cache.update(self.layer, keys_values)
        y = attend(q, k, v, self.dropout if self.training else 0.0)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(batch_size, length, dim)
        return self.out_dropout(self.out(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * config.dim)
        self.up = nn.Linear(config.dim, hidden)
        self.down = nn.Linear(hidden, config.dim)  # residual projection
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.dim)
        self.attention = SelfAttention(config, layer)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        height, width = config.grid_size
        prefix_width = config.num_prefix_tokens * config.dim
        self.null_embedding = nn.Parameter(torch.empty(config.clip_dim))
        self.condition_mlp = nn.Sequential(
            nn.Linear(config.clip_dim, config.dim),
            nn.GELU(),
            nn.Linear(config.dim, prefix_width),
        )
        self.prefix_position = nn.Parameter(torch.empty(config.num_prefix_tokens, config.dim))
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.row_embedding = nn.Embedding(height, config.dim)
        self.column_embedding = nn.Embedding(width, config.dim)
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: normal(0, 0.02), residual projections scaled by 1/sqrt(2L)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for block in self.blocks:
            nn.init.normal_(block.attention.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)
        nn.init.normal_(self.prefix_position, std=0.02)
        # CLIP embeddings are l2-normalised: start the null embedding at about unit norm too.
        nn.init.normal_(self.null_embedding, std=self.config.clip_dim**-0.5)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: decay the weight matrices of linear layers and nothing else.

        Norms, biases, embeddings, positions and the null embedding are left undecayed.
        """
        decay = [module.weight for module in self.modules() if isinstance(module, nn.Linear)]
        decay_ids = {id(parameter) for parameter in decay}
        no_decay = [p for p in self.parameters() if id(p) not in decay_ids]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def draw_drop_condition(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Which samples train unconditionally: True with probability p_uncond; (B,) bool."""
        draws = torch.rand(batch_size, device=device, generator=generator)
        return draws < self.config.p_uncond

    def embed_condition(
        self, clip_embedding: torch.Tensor, drop_condition: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prefix tokens from CLIP embeddings (B, E), or from the null embedding where dropped."""
        if drop_condition is not None:
            clip_embedding = torch.where(
                drop_condition[:, None], self.null_embedding, clip_embedding
            )
        prefix = rearrange(
            self.condition_mlp(clip_embedding), "b (p c) -> b p c", p=self.config.num_prefix_tokens
        )
        return prefix + self.prefix_position  # (B, P, C)

    def embed_codes(
        self, codes: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed codes (B, n) that sit at raster positions start .. start + n - 1; (B, n, C).

        `positions` (T, C) are `position_embeddings()` computed once, for callers that embed
        one code at a time.
        """
        if positions is None:
            positions = self.position_embeddings()
        return self.token_embedding(codes) + positions[start : start + codes.shape[1]]

    def position_embeddings(self) -> torch.Tensor:
        """Row plus column embedding of every raster position; (T, C)."""
        rows, columns = self.row_embedding.weight, self.column_embedding.weight
        return (rows[:, None] + columns[None]).flatten(0, 1)  # (h, 1, C) + (1, w, C)

    def forward(
        self,
        codes: torch.Tensor,
        clip_embedding: torch.Tensor,
        drop_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, n, vocab) for codes (B, n), n <= T: logits[:, t] predicts codes[:, t].

        Each prediction sees the condition and codes[:, :t] only, so codes[:, -1] is not read.
        """
        self._check_inputs(codes, clip_embedding, drop_condition)
        x = torch.cat(
            [
                self.embed_condition(clip_embedding, drop_condition),
                self.embed_codes(codes[:, :-1]),
            ],
            dim=1,
        )  # (B, P + n - 1, C)
        hidden = self._transform(x)
        return self.head(hidden[:, self.config.num_prefix_tokens - 1 :])  # (B, n, vocab)

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache long enough for one image, on the model's device and dtype."""
        config = self.config
        return KVCache(
            config.num_layers,
            batch_size,
            config.num_heads,
            config.max_len,
            config.dim // config.num_heads,
            device=self.head.weight.device,
            dtype=self.head.weight.dtype,
        )

    def prefill(
        self,
        clip_embedding: torch.Tensor,
        cache: KVCache,
        drop_condition: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the prefix, and any given first codes (B, n), into an empty cache.

        Returns the logits (B, vocab) of the next code: code 0, or code n when codes are given.
        """
        if cache.length:
            raise ValueError("prefill needs an empty cache; make one with model.new_cache.")
        x = self.embed_condition(clip_embedding, drop_condition)  # (B, P, C)
        if codes is not None:
            x = torch.cat([x, self.embed_codes(codes)], dim=1)  # (B, P + n, C)
        return self.head(self._transform(x, cache)[:, -1])

    def step(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the next codes (B, n), usually n = 1; return the logits (B, vocab) of the one after."""
        if cache.length < self.config.num_prefix_tokens:
            raise ValueError("step needs a cache that has seen the prefix; call prefill first.")
        x = self.embed_codes(codes, start=cache.length - self.config.num_prefix_tokens)
        return self.head(self._transform(x, cache)[:, -1])

    def _transform(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Embeddings (B, n, C) through the blocks and the final norm; (B, n, C)."""
        x = self.embedding_dropout(x)
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def _check_inputs(
        self,
        codes: torch.Tensor,
        clip_embedding: torch.Tensor,
        drop_condition: torch.Tensor | None,
    ) -> None:
        config = self.config
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= config.num_codes:
            raise ValueError(
                f"codes must have shape (batch, n) with 1 <= n <= {config.num_codes}, got "
                f"{tuple(codes.shape)}; flatten the (h, w) grid in raster order first."
            )
        batch_size = codes.shape[0]
        if clip_embedding.shape != (batch_size, config.clip_dim):
            raise ValueError(
                f"clip_embedding must have shape ({batch_size}, {config.clip_dim}) to match the "
                f"codes, got {tuple(clip_embedding.shape)}."
            )
        if drop_condition is not None and drop_condition.shape != (batch_size,):
            raise ValueError(
                f"drop_condition must be a bool mask of shape ({batch_size},), got "
                f"{tuple(drop_condition.shape)}."
            )
