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
from torch import nn

from generator.conditioning.condition import (
    Condition,
    as_condition,
    check_condition,
    distinct_rows,
)
from generator.conditioning.cross_attention import CrossKeysValues, GatedCrossAttention
from generator.conditioning.fusion import FUSIONS, Conditioner, extra_prefix_tokens
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
    # How the condition reaches the transformer (generator/conditioning/fusion.py).
    fusion: str = "pooled"  # pooled | early | resampler | deep
    token_dim: int = 0  # width W of CLIP's token features; from the shards where fusion reads them
    num_condition_tokens: int = 0  # their number L (CLIP's context length)
    word_embeddings: bool = False  # they hold CLIP's word embeddings too; from the shards
    num_latents: int = 8  # resampler: latents, each one prefix token
    cross_attention_every: int = 2  # deep: a gated cross-attention block before every k-th block
    p_drop_tokens: float = 0.1  # probability, in training, of the token features alone dropped

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
        self._check_fusion()

    def _check_fusion(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(
                f"generator.fusion must be one of {list(FUSIONS)}, got {self.fusion!r}."
            )
        if self.fusion != "pooled" and min(self.token_dim, self.num_condition_tokens) < 1:
            raise ValueError(
                f"generator.fusion={self.fusion} reads CLIP token features, but token_dim and "
                "num_condition_tokens are not set: scripts/train_generator.py takes them from "
                "shards encoded with tokens=true."
            )
        if min(self.num_latents, self.cross_attention_every) < 1:
            raise ValueError("generator.num_latents and cross_attention_every must be at least 1.")
        if not 0 <= self.p_drop_tokens <= 1:
            raise ValueError(
                f"generator.p_drop_tokens must be in [0, 1], got {self.p_drop_tokens}."
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
    def prefix_length(self) -> int:
        """Prefix tokens before the first code: P, plus what the fusion adds."""
        extra = extra_prefix_tokens(self.fusion, self.num_condition_tokens, self.num_latents)
        return self.num_prefix_tokens + extra

    @property
    def cross_attention_layers(self) -> list[int]:
        """The blocks deep fusion puts a gated cross-attention block before."""
        if self.fusion != "deep":
            return []
        return list(range(0, self.num_layers, self.cross_attention_every))

    @property
    def max_len(self) -> int:
        """Tokens the transformer ever reads: the prefix and every code but the last."""
        return self.prefix_length + self.num_codes - 1


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
        self.conditioner = Conditioner(config)
        self.cross_blocks = nn.ModuleDict(
            {
                str(layer): GatedCrossAttention(config.dim, config.num_heads, config.mlp_ratio)
                for layer in config.cross_attention_layers
            }
        )
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
        self.conditioner.reset_parameters(self.config.clip_dim)

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

    def forward(self, codes: torch.Tensor, condition: Condition | torch.Tensor) -> torch.Tensor:
        """Logits (B, n, vocab) for codes (B, n), n <= T: logits[:, t] predicts codes[:, t].

        `condition` is a Condition or a bare pooled CLIP embedding (B, E). Each prediction sees
        the condition and codes[:, :t] only, so codes[:, -1] is not read.
        """
        condition = as_condition(condition)
        self._check_inputs(codes, condition)
        prefix = self.conditioner.prefix(condition)  # (B, P', C)
        x = torch.cat([prefix, self.embed_codes(codes[:, :-1])], dim=1)  # (B, P' + n - 1, C)
        hidden = self._transform(x, cross=self.cross_keys_values(condition))
        return self.head(hidden[:, prefix.shape[1] - 1 :])  # (B, n, vocab)

    def cross_keys_values(self, condition: Condition) -> dict[int, CrossKeysValues]:
        """Deep fusion's keys and values of the condition, one entry per cross-attention block;
        computed once per condition (sampling keeps them beside the KV cache)."""
        if not self.cross_blocks:
            return {}
        context = self.conditioner.context(condition)
        return {
            int(layer): block.keys_values(context) for layer, block in self.cross_blocks.items()
        }

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
        condition: Condition | torch.Tensor,
        cache: KVCache,
        codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the prefix, and any given first codes (B, n), into an empty cache; deep fusion's
        condition keys and values go into the cache too.

        Returns the logits (B, vocab) of the next code: code 0, or code n when codes are given.
        On a CPU, rows that are alike (the candidates of one prompt, the unconditional half of a
        guided batch) run once and the cache copies them to each; a GPU runs every row, since
        finding them would wait for the GPU.
        """
        if cache.length:
            raise ValueError("prefill needs an empty cache; make one with model.new_cache.")
        condition = as_condition(condition)
        if condition.pooled.device.type != "cpu":
            return self._prefill(condition, cache, codes)
        distinct = distinct_rows(condition, codes)
        if len(distinct.first) == condition.batch_size:
            return self._prefill(condition, cache, codes)
        once = self.new_cache(len(distinct.first))
        first_codes = None if codes is None else codes[distinct.first]
        logits = self._prefill(condition.rows(distinct.first), once, first_codes)
        cache.take_rows(once, distinct.inverse)
        return logits[distinct.inverse]

    def _prefill(
        self, condition: Condition, cache: KVCache, codes: torch.Tensor | None
    ) -> torch.Tensor:
        """prefill for every row as it is."""
        cache.cross_keys_values = self.cross_keys_values(condition)
        x = self.conditioner.prefix(condition)  # (B, P', C)
        if codes is not None:
            x = torch.cat([x, self.embed_codes(codes)], dim=1)  # (B, P' + n, C)
        return self.head(self._transform(x, cache, cache.cross_keys_values)[:, -1])

    def step(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the next codes (B, n), usually n = 1; return the logits (B, vocab) of the one after."""
        if cache.length < self.config.prefix_length:
            raise ValueError("step needs a cache that has seen the prefix; call prefill first.")
        x = self.embed_codes(codes, start=cache.length - self.config.prefix_length)
        return self.head(self._transform(x, cache, cache.cross_keys_values)[:, -1])

    def _transform(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        cross: dict[int, CrossKeysValues] | None = None,
    ) -> torch.Tensor:
        """Embeddings (B, n, C) through the blocks (and deep fusion's cross-attention blocks,
        given the condition's keys and values) and the final norm; (B, n, C)."""
        x = self.embedding_dropout(x)
        for layer, block in enumerate(self.blocks):
            if cross:
                x = self.cross_blocks[str(layer)](x, cross[layer]) if layer in cross else x
            x = block(x, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def _check_inputs(self, codes: torch.Tensor, condition: Condition) -> None:
        config = self.config
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= config.num_codes:
            raise ValueError(
                f"codes must have shape (batch, n) with 1 <= n <= {config.num_codes}, got "
                f"{tuple(codes.shape)}; flatten the (h, w) grid in raster order first."
            )
        check_condition(condition, codes.shape[0], config)
