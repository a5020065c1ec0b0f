"""The KV cache: every layer's keys and values, preallocated once per sampling call.

Sampling runs the prefix once and then one code at a time; each new token attends to the keys
and values of every token before it, which the cache keeps instead of recomputing them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


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
        # Deep fusion's keys and values of the condition, by layer: set once by prefill.
        self.cross_keys_values: dict[int, Any] = {}

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

    def take_rows(self, source: KVCache, rows: torch.Tensor) -> None:
        """Fill this empty cache with rows (B,) of `source`'s batch, deep fusion's keys and
        values included: the prefix run once for rows that are alike, copied to each."""
        length = source.length
        self.keys_values[..., :length, :] = source.keys_values[..., :length, :][:, :, rows]
        self.length = length
        self.cross_keys_values = {
            layer: type(kv)(*(t[rows] for t in kv))
            for layer, kv in source.cross_keys_values.items()
        }

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
