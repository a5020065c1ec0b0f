"""Where open_clip's towers keep their per-token output: the final norm a text transformer
applies to every position and a vision transformer to every patch, just before pooling and
projection. `CLIPEncoder` listens to that norm while it computes its usual embedding, so the
token features come from the very pass that gives the pooled vector. It can also listen to the
input of the tower's transformer: each token's word embedding plus its position embedding,
before any attention has mixed the tokens.

Supported: open_clip's `CLIP` and `CustomTextCLIP` text transformers (not CoCa-style ones that
pool a class token before their norm, nor Hugging Face text towers), and `VisionTransformer`
towers that pool the class token or the mean of the patches after their final norm. Other towers
(ResNets, timm models, attention pooling) raise a ValueError that says which CLIP to use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import open_clip
import torch
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import nn

WITH_TOKENS = "a ViT CLIP with open_clip's own text transformer, such as ViT-B-32"


class TokenTower(NamedTuple):
    """A tower's final norm, whose output holds one feature vector per token (or patch), and
    its transformer, whose input holds each token's embedding."""

    norm: nn.Module
    transformer: nn.Module
    length: int  # tokens per caption (the context length), or patches per image
    width: int  # features per token
    skip: int  # leading positions that are no token of the input (the class token)


def text_tower(model: nn.Module) -> TokenTower:
    """The text tower's final norm over all positions, or a ValueError naming what to use."""
    if isinstance(model, open_clip.CLIP):
        width = model.transformer.width
        return TokenTower(model.ln_final, model.transformer, model.context_length, width, 0)
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer) and text.cls_emb is None:
        return TokenTower(text.ln_final, text.transformer, text.context_length, text.width, 0)
    kind = type(text if text is not None else model).__name__
    raise ValueError(
        f"This CLIP's text tower ({kind}) has no per-token output after its final norm, so it "
        f"cannot give text token features: use {WITH_TOKENS}."
    )


def vision_tower(model: nn.Module) -> TokenTower:
    """The vision tower's final norm over all patches, or a ValueError naming what to use."""
    visual = getattr(model, "visual", None)
    pools_after_norm = (
        isinstance(visual, VisionTransformer)
        and visual.attn_pool is None
        and not visual.final_ln_after_pool
        and visual.pool_type in ("tok", "avg")
    )
    if not pools_after_norm:
        raise ValueError(
            f"This CLIP's vision tower ({type(visual).__name__}) has no per-patch output after "
            f"its final norm, so it cannot give image token features: use {WITH_TOKENS}."
        )
    rows, cols = visual.grid_size
    width = visual.conv1.out_channels
    return TokenTower(visual.ln_post, visual.transformer, rows * cols, width, 1)


@contextmanager
def captured_output(
    tower: TokenTower, batch: int, inputs: bool = False
) -> Iterator[Callable[[], torch.Tensor]]:
    """Within the block, the tower's norm keeps its output (with `inputs`, its transformer keeps
    its input instead); the yielded function returns the token features (batch, length, width)
    of the one pass run inside it."""
    outputs: list[torch.Tensor] = []
    if inputs:
        handle = tower.transformer.register_forward_pre_hook(
            lambda module, args: outputs.append(args[0])
        )
    else:
        handle = tower.norm.register_forward_hook(
            lambda module, args, output: outputs.append(output)
        )

    def tokens() -> torch.Tensor:
        expected = (batch, tower.skip + tower.length, tower.width)
        if len(outputs) != 1 or tuple(outputs[0].shape) != expected:
            shapes = [tuple(output.shape) for output in outputs]
            where = "transformer's input" if inputs else "final norm"
            raise ValueError(
                f"This CLIP's {where} gave outputs of shapes {shapes}, not one of {expected}: "
                f"its tower works differently from open_clip's; use {WITH_TOKENS}."
            )
        return outputs[0][:, tower.skip :].float()

    try:
        yield tokens
    finally:
        handle.remove()
