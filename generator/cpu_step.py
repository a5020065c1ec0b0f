"""The one-code sampling step, tuned for a CPU: `OneCodeStep`, built by the sampler per call.

At batch 1 a step of a small GPT on a CPU is short enough that calling torch costs as much as
computing: every module call, keyword argument and `nn.Parameter` check shows. `OneCodeStep`
takes what the blocks compute out of the modules once (detached weights, norms as single
calls, the position embeddings of every code) and runs a step as straight torch calls on them.
Where it pays, the large weights are also held a second time, laid out for products of the
step's few rows (`packing`). The model itself carries none of this: the sampler builds a step,
uses it for one `generate` call and drops it. In bf16 or fp16, or on a GPU, the same step runs
with plain products: packing is for fp32 only, so on a CPU half precision trades the packed
products for half the bytes (generator/precision.py's `auto` measures which is faster). On a
GPU the sampler replays a CUDA graph of generator/cuda_graph_step.py's step instead, and falls
back to this one where it cannot.

Its arithmetic is `Block.forward`'s, in the same order, so its logits match the model's
forward pass (tested).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from generator.gpt import GPT, Block
from generator.kv_cache import KVCache

Product = Callable[[torch.Tensor], torch.Tensor]  # (rows, in) -> (rows, out)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Weight matrices of at least MIN_PACKED_WEIGHTS entries are packed for products of at most
# MAX_PACKED_ROWS rows; smaller matrices (the tiny preset's) ran faster as they are.
MAX_PACKED_ROWS = 32
MIN_PACKED_WEIGHTS = 2**17
# The step's exact GELU of at most this many values runs ATen's kernel (see gelu_by_aten).
ATEN_GELU_MAX_VALUES = 4096


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
    """How a step of `rows` rows lays out its large weights on `device`: None, or the class
    that holds them; measured faster on a CPU in fp32 than its plain products.

    One row runs as ThreadBlocks where there are several threads; 2 to MAX_PACKED_ROWS rows
    run oneDNN's packed product. GPUs spread one product over their cores by themselves, and a
    CPU without native bf16 runs batched bf16 matmuls far slower than its one-row product.
    """
    if device.type != "cpu" or dtype != torch.float32 or rows > MAX_PACKED_ROWS:
        return None
    if rows == 1:
        return ThreadBlocks if torch.get_num_threads() > 1 else None
    return OneDNNPacked if torch.backends.mkldnn.is_available() else None


def few_rows_product(linear: nn.Linear, rows: int) -> Product:
    """What multiplies (rows, in) by `linear`'s weight in a step of `rows` rows: a packed copy
    where `packing` says so and the matrix has MIN_PACKED_WEIGHTS entries, else F.linear on
    the detached weight (see layer_norm_of)."""
    weight = linear.weight.detach()
    layout = packing(weight.device, weight.dtype, rows)
    if layout is not None and weight.numel() >= MIN_PACKED_WEIGHTS:
        return layout(linear, rows)
    bias = None if linear.bias is None else linear.bias.detach()
    return lambda x: F.linear(x, weight, bias)


def layer_norm_of(norm: nn.LayerNorm) -> Product:
    """The norm as one call into torch: its parameters detached (an nn.Parameter argument sends
    every call through Python's __torch_function__ check) and passed by position, which torch
    parses faster than keywords."""
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


def product_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q keys^T / sqrt(head_dim)) values as two batched products; q (B, heads, 1, d)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(-1), values)


ATTENTIONS: dict[str, Attention] = {
    "sdpa": F.scaled_dot_product_attention,
    "products": product_attention,
}
_measured_attention: dict[tuple, str] = {}


def median_seconds(calls: Sequence[Callable[[], object]], warmup: int) -> float:
    """Median wall seconds of `calls`, run in order, leaving out the first `warmup` of them."""
    seconds = []
    for call in calls:
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[warmup:])


def attention_seconds(attention: Attention, inputs: tuple[torch.Tensor, ...]) -> float:
    """Median seconds of `attention` on `inputs`, after two calls that warm it up."""
    return median_seconds([lambda: attention(*inputs)] * 7, warmup=2)


def one_query_attention(model: GPT, rows: int) -> str:
    """The name of the faster attention, measured on this CPU, for a step of `rows` rows whose
    query each attends to the cache half filled; measured once per shape and thread count in a
    process. Anything but an fp32 CPU step runs SDPA.

    ATen's CPU SDPA multiplies each row's and head's single query apart: for 480 rows and 4
    heads the two batched products of `product_attention` ran 1.2 to 1.3x faster on the cache's
    views, while for one row SDPA ran about 2x faster (the README's Performance section).
    """
    config, weight = model.config, model.head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "sdpa"
    heads, head_dim = config.num_heads, config.dim // config.num_heads
    length = config.prefix_length + config.num_codes // 2
    key = (rows, heads, head_dim, length, torch.get_num_threads())
    if key not in _measured_attention:
        with torch.inference_mode():
            inputs = step_attention_inputs(rows, heads, head_dim, length, config.max_len)
            times = {name: attention_seconds(f, inputs) for name, f in ATTENTIONS.items()}
        _measured_attention[key] = min(times, key=times.get)
    return _measured_attention[key]


def step_attention_inputs(
    rows: int, heads: int, head_dim: int, length: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A query and the keys and values before it, laid out as a step reads them: the query a
    view of the step's qkv product, the keys and values views of a KV cache `length` long.
    Drawn from a generator of their own, so that measuring leaves the caller's draws alone."""
    draws = torch.Generator().manual_seed(0)
    qkv = torch.randn(rows, 3, heads, 1, head_dim, generator=draws)
    cache = KVCache(1, rows, heads, max_len, head_dim)
    cache.keys_values.normal_(generator=draws)
    cache.advance(length - 1)  # as if earlier steps had filled it
    keys, values = cache.update(0, qkv[:, 1:].transpose(0, 1))
    return qkv[:, 0], keys, values


class BlockStep(NamedTuple):
    """A block's norms and products, taken out of its modules once."""

    attention_norm: Product
    qkv: Product
    out: Product
    mlp_norm: Product
    up: Product
    down: Product

    @classmethod
    def of(cls, block: Block, rows: int) -> BlockStep:
        attention, mlp = block.attention, block.mlp
        return cls(
            layer_norm_of(block.attention_norm),
            few_rows_product(attention.qkv, rows),
            few_rows_product(attention.out, rows),
            layer_norm_of(block.mlp_norm),
            few_rows_product(mlp.up, rows),
            few_rows_product(mlp.down, rows),
        )


class OneCodeStep:
    """`GPT.step` for one code per row of an eval-mode model, `rows` rows a step.

    Built from the model's weights as they are: build a new one after the weights change.
    """

    def __init__(self, model: GPT, rows: int) -> None:
        self.model = model
        self.num_heads = model.config.num_heads
        with torch.no_grad():
            self.positions = model.position_embeddings()  # (T, C)
            self.blocks = [BlockStep.of(block, rows) for block in model.blocks]
            self.norm = layer_norm_of(model.norm)
            self.head = few_rows_product(model.head, rows)
        self.cross_blocks = {int(layer): block for layer, block in model.cross_blocks.items()}
        self.attention = ATTENTIONS[one_query_attention(model, rows)]

    def __call__(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one code (B,) per row; return the logits (B, vocab) of the next."""
        cache.check_room(1)
        rows, start = codes.shape[0], cache.length - self.model.config.prefix_length
        x = self.model.embed_codes(codes[:, None], start, self.positions).view(rows, -1)  # (B, C)
        for layer, block in enumerate(self.blocks):
            if layer in self.cross_blocks:  # deep fusion: the condition's keys and values, kept
                cross = self.cross_blocks[layer]
                x = cross(x[:, None], cache.cross_keys_values[layer]).view(rows, -1)
            qkv = block.qkv(block.attention_norm(x)).view(rows, 3, self.num_heads, 1, -1)
            # (B, heads, n, head_dim) each, n = the cache's length + 1
            keys, values = cache.update(layer, qkv[:, 1:].transpose(0, 1))
            y = self.attention(qkv[:, 0], keys, values)
            x = x + block.out(y.reshape(rows, -1))
            x = x + block.down(gelu_by_aten(block.up(block.mlp_norm(x))))
        cache.advance(1)
        return self.head(self.norm(x))
