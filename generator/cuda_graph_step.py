"""The GPU's one-code step free of launch overhead: the whole step recorded once as a CUDA graph
and replayed for every code.

At batch 1 a GPU computes a step of the reference GPT (8 layers, about 90 MB of bf16 weights) in
tens of microseconds, while launching its hundred-odd kernels one by one from Python takes far
longer. A CUDA graph records the kernels once and launches them all with one call. A graph
replays fixed addresses and shapes, so the step it records (`PositionedStep`) differs from
`OneCodeStep` (generator/cpu_step.py) in one thing: the cache slot of the new token is a device
tensor set before each replay, not a Python int. The new keys and values are written into that
slot with `index_copy_`, and attention runs over the whole preallocated cache with the slots
after it masked out, so no step index is baked into the graph. Its arithmetic is otherwise
`Block.forward`'s, and its logits match the model's forward pass (tested, on a CPU as well).

Capture happens once per `generate` call, at its first step, and the graph is dropped when the
call returns. A graph bakes in the address of everything it reads: the call's KV cache and
buffers, the condition's cross-attention keys and values, and the model's weights. Cached across
calls, it would need a KV cache that outlives every call (about 1 GiB for 256 guided images of
the reference size, per batch size and precision), keyed by the model, and it would read stale
or freed memory once the weights were cast, moved or replaced (`model.to`, an EMA swap during
training). Per call nothing can go stale, and capture costs one eager step plus instantiating
the graph, once for the 255 steps of a 256-code image (the benchmark's graph figures include it).

Eager instead where a graph does not apply (`graph_skip_reason`): on a CPU (no launches to
save), with `cuda_graph=False`, or inside another capture. A capture that fails warns
(`GraphCaptureWarning`) and its call goes on eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from generator.gpt import GPT
from generator.kv_cache import KVCache

Step = Callable[[torch.Tensor], torch.Tensor]  # codes (B,) -> logits (B, vocab)


class GraphCaptureWarning(RuntimeWarning):
    """A CUDA graph of the sampling step could not be captured; the call went on eagerly."""


def graph_skip_reason(device: torch.device, wanted: bool) -> str | None:
    """None where a sampling call on `device` replays a CUDA graph; otherwise why it runs eagerly."""
    if not wanted:
        return "cuda_graph=False"
    if device.type != "cuda":
        return f"the model is on {device.type}: CUDA graphs replay GPU kernels only"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured already"
    return None


class PositionedStep:
    """`OneCodeStep`'s arithmetic over the whole preallocated cache, the new token's slot read
    from the device tensor `slot` (its caller sets it; the cache's length is not advanced)."""

    def __init__(self, model: GPT, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.num_heads = model.config.num_heads
        self.first_code_slot = model.config.prefix_length
        device = model.head.weight.device
        with torch.no_grad():
            self.positions = model.position_embeddings()  # (T, C)
        self.slots = torch.arange(cache.max_len, device=device)  # (max_len,)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the new token's
        # Masked slots still enter the attention kernels' arithmetic (0 x value): they must hold
        # numbers, not what the allocator left there, which may be NaN.
        unwritten = cache.max_len - cache.length
        cache.keys_values.narrow(4, cache.length, unwritten).zero_()
        self.cross_blocks = {int(layer): block for layer, block in model.cross_blocks.items()}

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        """Feed one code (B,) per row into `slot`; return the logits (B, vocab) of the next."""
        model, rows, cache = self.model, codes.shape[0], self.cache
        position = self.positions.index_select(0, self.slot - self.first_code_slot)  # (1, C)
        x = model.token_embedding(codes) + position  # (B, C)
        visible = (self.slots <= self.slot).view(1, 1, 1, -1)  # the slots up to the new one
        for layer, block in enumerate(model.blocks):
            if layer in self.cross_blocks:  # deep fusion: the condition's keys and values, kept
                cross = self.cross_blocks[layer]
                x = cross(x[:, None], cache.cross_keys_values[layer]).view(rows, -1)
            attention = block.attention
            qkv = attention.qkv(block.attention_norm(x)).view(rows, 3, self.num_heads, 1, -1)
            layer_cache = cache.layers[layer]  # (2, B, heads, max_len, head_dim)
            layer_cache.index_copy_(3, self.slot, qkv[:, 1:].transpose(0, 1))
            keys, values = layer_cache.unbind()
            y = F.scaled_dot_product_attention(qkv[:, 0], keys, values, attn_mask=visible)
            x = x + attention.out(y.reshape(rows, -1))
            x = x + block.mlp.down(F.gelu(block.mlp.up(block.mlp_norm(x))))
        return model.head(model.norm(x))


class CapturedStep:
    """A step `run(codes) -> logits` recorded once as a CUDA graph, then replayed: each call
    copies its codes into the graph's input and returns the graph's output, which the next call
    overwrites."""

    def __init__(self, run: Step, codes: torch.Tensor) -> None:
        """Record `run` on a copy of `codes` (B,). One eager run on the capture's stream comes
        first: cuBLAS and the allocator set up per stream, which a capture cannot do. It writes
        the same cache slot that the first replay writes again."""
        self.codes = codes.clone(memory_format=torch.contiguous_format)  # the graph's input
        caller = torch.cuda.current_stream(codes.device)
        side = torch.cuda.Stream(codes.device)  # capture needs a stream other than the default
        side.wait_stream(caller)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                run(self.codes)
                self.logits = self._record(run)
        finally:
            caller.wait_stream(side)

    def _record(self, run: Step) -> torch.Tensor:
        # thread_local: another thread's CUDA calls (a web server's) do not spoil the capture
        self.graph.capture_begin(capture_error_mode="thread_local")
        try:
            logits = run(self.codes)
        except BaseException:
            with contextlib.suppress(RuntimeError):  # the error that stopped the capture wins
                self.graph.capture_end()
            raise
        self.graph.capture_end()
        return logits

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        self.codes.copy_(codes)
        self.graph.replay()
        return self.logits
