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
preallocated `KVCache`; `forward` is the full pass used for training and as the reference.
Inside `sampling_mode`, a one-code step (`step_one_code`) calls torch straight on tensors taken
out of the modules once, with the large weights packed for its few rows on a CPU: at batch 1 a
step is short enough that calling torch costs as much as computing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizer.base.configs import checked_config

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "small": {"dim": 384, "num_layers": 8, "num_heads": 6},
    "base": {"dim": 768, "num_layers": 12, "num_heads": 12},
    "large": {"dim": 1024, "num_layers": 24, "num_heads": 16},
}
# Sampling on a CPU holds a copy of each weight matrix of at least MIN_PACKED_WEIGHTS entries
# laid out for products of at most MAX_PACKED_ROWS rows (see Linear.pack); smaller matrices (the
# tiny preset's) ran faster as they are.
MAX_PACKED_ROWS = 32
MIN_PACKED_WEIGHTS = 2**17
# Sampling's exact GELU of at most this many values runs ATen's kernel (see gelu_by_aten).
ATEN_GELU_MAX_VALUES = 4096


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


class KeysValues(NamedTuple):
    keys: torch.Tensor  # (B, heads, length, head_dim)
    values: torch.Tensor  # (B, heads, length, head_dim)


class KVCache:
    """Keys and values of every layer, preallocated and filled in place as tokens arrive.

    Every layer writes its new keys and values at `length`, both in one copy; the model calls
    `advance` once the last layer is done. `length` is a Python int, so the cache never asks
    the device anything.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (num_layers, 2, batch_size, num_heads, max_len, head_dim)
        self.keys_values = torch.empty(shape, device=device, dtype=dtype)
        self.layers = list(self.keys_values)  # (2, B, heads, max_len, head_dim) each
        self.length = 0

    @property
    def keys(self) -> torch.Tensor:  # (layers, B, heads, max_len, head_dim)
        return self.keys_values[:, 0]

    @property
    def values(self) -> torch.Tensor:  # (layers, B, heads, max_len, head_dim)
        return self.keys_values[:, 1]

    @property
    def batch_size(self) -> int:
        return self.keys_values.shape[2]

    @property
    def max_len(self) -> int:
        return self.keys_values.shape[4]

    def check_room(self, num_tokens: int) -> None:
        if self.length + num_tokens > self.max_len:
            raise ValueError(
                f"The KV cache holds {self.max_len} tokens and already has {self.length}; "
                f"it cannot take {num_tokens} more. Make a longer one with model.new_cache."
            )

    def update(self, layer: int, keys_values: torch.Tensor) -> KeysValues:
        """Store a layer's new keys and values (2, B, heads, n, head_dim); return all so far."""
        num_tokens = keys_values.shape[-2]
        self.check_room(num_tokens)
        layer_cache = self.layers[layer]
        layer_cache.narrow(3, self.length, num_tokens).copy_(keys_values)
        return KeysValues(*layer_cache.narrow(3, 0, self.length + num_tokens).unbind())

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


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


class ThreadBlocks:
    """A weight as one block of input rows per thread (k, in / k, out), multiplied as one batched
    matmul whose k partial products are then summed.

    MKL runs a one-row product on one thread, which reads the weight at about half of what two
    cores can (see the README's Performance section); torch spreads a batched matmul's blocks
    over the threads. Split by inputs rather than outputs, every thread reads whole rows of the
    weight, which stream faster than short ones.
    """

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        parts = torch.get_num_threads()
        while linear.in_features % parts:
            parts -= 1
        weight = linear.weight.detach().t()  # (in, out)
        self.weight = weight.reshape(parts, -1, linear.out_features).contiguous()
        self.bias = None
        if linear.bias is not None:  # added once, to the first block's partial product
            self.bias = linear.bias.new_zeros(parts, 1, linear.out_features)
            self.bias[0, 0] = linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out)."""
        parts, rows = self.weight.shape[0], x.shape[0]
        # (k, rows, in / k); a single row needs no transpose
        x = x.reshape(parts, 1, -1) if rows == 1 else x.reshape(rows, parts, -1).transpose(0, 1)
        if self.bias is None:
            partial_products = torch.bmm(x, self.weight)
        else:
            partial_products = torch.baddbmm(self.bias, x, self.weight)  # (k, rows, out)
        return partial_products.sum(0)


class OneDNNPacked:
    """A weight reordered once by oneDNN for products of a few rows.

    MKL's sgemm repacks the weight at every call, which for a few rows costs as much as the
    product; oneDNN's packed linear layer runs on the packed copy, on every thread.
    """

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def packing(
    device: torch.device, dtype: torch.dtype, rows: int
) -> type[ThreadBlocks] | type[OneDNNPacked] | None:
    """How sampling with `rows` rows a step lays out its large weights on `device`: None, or
    the class that holds them; measured faster on a CPU in fp32 than its plain products.

    One row runs as ThreadBlocks where there are several threads; 2 to MAX_PACKED_ROWS rows
    run oneDNN's packed product. GPUs spread one product over their cores by themselves, and a
    CPU without native bf16 runs batched bf16 matmuls far slower than its one-row product.
    """
    if device.type != "cpu" or dtype != torch.float32 or rows > MAX_PACKED_ROWS:
        return None
    if rows == 1:
        return ThreadBlocks if torch.get_num_threads() > 1 else None
    return OneDNNPacked if torch.backends.mkldnn.is_available() else None


class Linear(nn.Linear):
    """nn.Linear that sampling can give a copy of its weight laid out for products of few rows.

    While `packed` holds one (a ThreadBlocks or OneDNNPacked), inputs of at most
    MAX_PACKED_ROWS rows are multiplied by it; the copy is not part of the state dict.
    """

    packed: ThreadBlocks | OneDNNPacked | None = None

    def pack(self, layout: type[ThreadBlocks] | type[OneDNNPacked] | None, rows: int) -> None:
        """Hold the weight in `layout` (from `packing`) for `rows` rows a product; a matrix of
        fewer than MIN_PACKED_WEIGHTS entries stays as it is."""
        if layout is not None and self.weight.numel() >= MIN_PACKED_WEIGHTS:
            self.packed = layout(self, rows)

    def unpack(self) -> None:
        self.packed = None

    def few_rows_product(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What multiplies (rows, in) by the weight for the rows it was packed for: the packed
        copy, or F.linear where there is none."""
        if self.packed is not None:
            return self.packed
        weight = self.weight.detach()  # see layer_norm_of
        bias = None if self.bias is None else self.bias.detach()
        return lambda x: F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.numel() > MAX_PACKED_ROWS * self.in_features:
            return super().forward(x)
        y = self.packed(x.reshape(-1, self.in_features))  # (rows, out)
        return y.view(*x.shape[:-1], self.out_features)


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
        self.qkv = Linear(config.dim, 3 * config.dim)
        self.out = Linear(config.dim, config.dim)  # residual projection
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
        self.up = Linear(config.dim, hidden)
        self.down = Linear(hidden, config.dim)  # residual projection
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


class BlockStep(NamedTuple):
    """A block's norms and products, taken out of its modules once for GPT.step_one_code."""

    attention_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]
    mlp_norm: Callable[[torch.Tensor], torch.Tensor]
    up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, block: Block) -> BlockStep:
        attention, mlp = block.attention, block.mlp
        return cls(
            layer_norm_of(block.attention_norm),
            attention.qkv.few_rows_product(),
            attention.out.few_rows_product(),
            layer_norm_of(block.mlp_norm),
            mlp.up.few_rows_product(),
            mlp.down.few_rows_product(),
        )


def layer_norm_of(norm: nn.LayerNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The norm as one call into torch, for sampling's steps: its parameters detached (an
    nn.Parameter argument sends every call through Python's __torch_function__ check) and
    passed by position, which torch parses faster than keywords."""
    shape, eps = norm.normalized_shape, norm.eps
    weight = None if norm.weight is None else norm.weight.detach()
    bias = None if norm.bias is None else norm.bias.detach()
    return lambda x: torch.layer_norm(x, shape, weight, bias, eps)


def gelu_by_aten(x: torch.Tensor) -> torch.Tensor:
    """F.gelu (exact) of x, computed by ATen's own kernel where x holds few values.

    On a CPU, F.gelu hands a contiguous float tensor to oneDNN, whose fixed cost outweighs the
    arithmetic for one step's few rows: ATen's kernel, given a strided view of the same values,
    made a whole `small` step 4% faster. From about ATEN_GELU_MAX_VALUES values on, oneDNN's
    arithmetic is the faster.
    """
    few = x.numel() <= ATEN_GELU_MAX_VALUES and x.numel() % 2 == 0
    if x.device.type != "cpu" or not few or not x.is_contiguous():
        return F.gelu(x)
    return F.gelu(x.view(-1, 2).t()).t().view(x.shape)


class SamplingState(NamedTuple):
    """What every sampling step reuses, held by GPT.sampling_mode."""

    positions: torch.Tensor  # (T, C), the position embedding of every code
    blocks: list[BlockStep]
    norm: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]


class GPT(nn.Module):
    sampling: SamplingState | None = None  # held by sampling_mode

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
        self.head = Linear(config.dim, config.vocab_size, bias=False)
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

    def embed_codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embed codes (B, n) that sit at raster positions start .. start + n - 1; (B, n, C)."""
        if self.sampling is not None:
            positions = self.sampling.positions
        else:
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

    @contextmanager
    def sampling_mode(self, rows: int) -> Iterator[None]:
        """Hold what every step of sampling `rows` rows reuses, until exit; the weights must not
        change meanwhile.

        That is the position embeddings of every code and, where `packing` says so, a second
        copy of the large weight matrices laid out for products of `rows` rows.
        """
        linears = [module for module in self.modules() if isinstance(module, Linear)]
        layout = packing(self.head.weight.device, self.head.weight.dtype, rows)
        try:
            with torch.no_grad():
                for linear in linears:
                    linear.pack(layout, rows)
                self.sampling = SamplingState(
                    self.position_embeddings(),
                    [BlockStep.of(block) for block in self.blocks],
                    layer_norm_of(self.norm),
                    self.head.few_rows_product(),
                )
            yield
        finally:
            self.sampling = None
            for linear in linears:
                linear.unpack()

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
        if self.sampling is not None and codes.shape[1] == 1 and not self.training:
            return self.step_one_code(codes[:, 0], cache)
        x = self.embed_codes(codes, start=cache.length - self.config.num_prefix_tokens)
        return self.head(self._transform(x, cache)[:, -1])

    def step_one_code(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """`step` for one code (B,) per row in eval mode, inside `sampling_mode`; (B, vocab).

        The blocks' arithmetic, called straight on tensors taken out of the modules once: a
        one-code step of a small model on a CPU spends as long calling torch as computing, and
        sampling is nothing but these steps.
        """
        cache.check_room(1)
        sampling, position, rows = self.sampling, cache.length, codes.shape[0]
        x = self.embed_codes(codes[:, None], start=position - self.config.num_prefix_tokens)
        x = x.view(rows, -1)  # (B, C)
        for layer, block in enumerate(sampling.blocks):
            qkv = block.qkv(block.attention_norm(x)).view(rows, 3, self.config.num_heads, 1, -1)
            # (B, heads, n, head_dim) each, n = position + 1
            keys, values = cache.update(layer, qkv[:, 1:].transpose(0, 1))
            y = F.scaled_dot_product_attention(qkv[:, 0], keys, values)
            x = x + block.out(y.reshape(rows, -1))
            x = x + block.down(gelu_by_aten(block.up(block.mlp_norm(x))))
        cache.advance(1)
        return sampling.head(sampling.norm(x))

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
