"""The frozen CLIP encoder: `CLIPEncoder` turns captions and images (tensors in [-1, 1]) into
l2-normalised embeddings, with the model's own tokenizer, and `ImagePreprocess` does the
model's own resize + mean/std normalisation as tensor ops on the batch. `fingerprint` names the
exact weights and preprocessing an encoder holds. Beside the pooled embedding, the encoder gives
each tower's per-token output (`TextTokens`, `ImageTokens`; see towers.py).

CLIP's text transformer is causal: each token's last hidden state has read only the tokens
before it, so in "a blue circle" the feature of "circle" is a circle seen after "blue". For a
colour-shape pair no training caption names, that mixture is one the generator never met, and it
draws the colour in a shape it was trained with. `word_embeddings=True` sets each token's word
embedding (plus position, before any attention, layer-normalised like the last hidden states)
beside its last hidden state, so a generator can also read every word on its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from generator.clip.config import CLIPConfig
from generator.clip.towers import captured_output, text_tower, vision_tower

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default image normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class ImagePreprocess:
    """A CLIP model's own input transform, as tensor ops on a batch already in memory:
    [-1, 1] -> [0, 1], resize to the model's input size, then its mean/std normalisation."""

    size: tuple[int, int]  # (H, W) the model reads
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # shortest side to size then centre crop, or squash

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES or self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"CLIP preprocessing with resize_mode={self.resize_mode!r} and interpolation="
                f"{self.interpolation!r} is not supported here; supported: {RESIZE_MODES} and "
                f"{INTERPOLATIONS}. Choose another open_clip model."
            )

    @classmethod
    def of(cls, model: nn.Module) -> ImagePreprocess:
        """The preprocessing open_clip recorded on the model when it was created."""
        config = open_clip.get_model_preprocess_cfg(model)
        size = config["size"]
        return cls(
            size=(size, size) if isinstance(size, int) else tuple(size),
            mean=tuple(config.get("mean", OPENAI_MEAN)),
            std=tuple(config.get("std", OPENAI_STD)),
            interpolation=config.get("interpolation", "bicubic"),
            resize_mode=config.get("resize_mode", "shortest"),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, *size), normalised as the model was trained."""
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != self.size:
            x = self._resize(x)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            scaled = (target_h, target_w)
        else:  # shortest: scale so the image covers the target, then crop the centre
            scale = max(target_h / height, target_w / width)
            scaled = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
        x = F.interpolate(x, size=scaled, mode=self.interpolation, antialias=True)
        top, left = (scaled[0] - target_h) // 2, (scaled[1] - target_w) // 2
        return x[..., top : top + target_h, left : left + target_w].clamp(0, 1)


Tokenize = Callable[[list[str]], torch.Tensor]  # captions -> (B, context_length) token ids


class TextTokens(NamedTuple):
    pooled: torch.Tensor  # (B, E) float32 unit vectors, exactly what encode_text returns
    features: torch.Tensor  # (B, L, W) float32: the text tower's last hidden states after its
    # final norm (before pooling and projection); (B, L, 2W) with word embeddings, those states
    # then each token's word embedding; L the context length; zeros at padding
    mask: torch.Tensor  # (B, L) bool, True at real tokens (start token, words, end token)


class ImageTokens(NamedTuple):
    pooled: torch.Tensor  # (B, E) float32 unit vectors, exactly what encode_image returns
    features: torch.Tensor  # (B, N, W') float32: the vision tower's per-patch output after its
    # final norm (no class token, before the projection)


def text_feature_shape(clip: CLIPEncoder, word_embeddings: bool) -> tuple[int, int]:
    """(L, W) of a CLIP's text token features: its context length, and its text tower's width,
    twice that with word embeddings."""
    length, width = clip.text_token_shape
    return length, width * 2 if word_embeddings else width


def _pad_id(tokenize: Tokenize) -> int:
    """The token id that pads captions: a Hugging Face tokenizer's own, else open_clip's 0."""
    pad_id = getattr(getattr(tokenize, "tokenizer", None), "pad_token_id", None)
    return 0 if pad_id is None else int(pad_id)


class CLIPEncoder(nn.Module):
    """Frozen CLIP: captions or images in, l2-normalised embeddings (B, embed_dim) out.

    Embeddings are computed under `torch.no_grad` (not inference mode, so they can still feed a
    model that trains on them) in float32, in chunks of `batch_size`, and come back on the
    encoder's device.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenize: Tokenize,
        preprocess: ImagePreprocess,
        config: CLIPConfig,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.preprocess = preprocess
        self.config = config
        self.embed_dim = embed_dim
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> CLIPEncoder:
        """The encoder stays in eval mode: it only ever runs inference."""
        return super().train(False)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> (B, E) unit vectors."""
        chunks = [self._pooled_text(tokens) for tokens in self._tokens(captions, batch_size)]
        return self._concat(chunks, self.embed_dim)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1], any size -> (B, E) unit vectors."""
        chunks = [self._pooled_image(pixels) for pixels in self._pixels(images, batch_size)]
        return self._concat(chunks, self.embed_dim)

    @property
    def text_token_shape(self) -> tuple[int, int]:
        """(L, W): tokens per caption (the context length) and the text tower's width."""
        tower = text_tower(self.model)
        return tower.length, tower.width

    @property
    def image_token_shape(self) -> tuple[int, int]:
        """(N, W'): patches per image and the vision tower's width."""
        tower = vision_tower(self.model)
        return tower.length, tower.width

    @torch.no_grad()
    def encode_text_tokens(
        self, captions: Sequence[str], batch_size: int = 256, word_embeddings: bool = False
    ) -> TextTokens:
        """Captions -> their pooled embedding and the text tower's per-token output, with
        `word_embeddings` also each token's word embedding (see the module's docstring)."""
        tower = text_tower(self.model)
        pooled, features, masks = [], [], []
        for tokens in self._tokens(captions, batch_size):
            batch = tokens.shape[0]
            inputs = (
                captured_output(tower, batch, inputs=True) if word_embeddings else nullcontext()
            )
            with captured_output(tower, batch) as hidden, inputs as embedded:
                pooled.append(self._pooled_text(tokens))
            found = hidden()  # (b, L, W)
            if word_embeddings:
                words = F.layer_norm(embedded(), (tower.width,))
                found = torch.cat([found, words], dim=-1)  # (b, L, 2W)
            mask = tokens != _pad_id(self.tokenize)
            features.append(found * mask.unsqueeze(-1))
            masks.append(mask)
        shape = text_feature_shape(self, word_embeddings)
        return TextTokens(
            self._concat(pooled, self.embed_dim),
            self._concat(features, *shape),
            self._concat(masks, shape[0]).bool(),
        )

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor, batch_size: int = 256) -> ImageTokens:
        """Images (B, 3, H, W) in [-1, 1] -> their pooled embedding and per-patch output."""
        tower = vision_tower(self.model)
        pooled, features = [], []
        for pixels in self._pixels(images, batch_size):
            with captured_output(tower, pixels.shape[0]) as patches:
                pooled.append(self._pooled_image(pixels))
            features.append(patches())
        return ImageTokens(
            self._concat(pooled, self.embed_dim), self._concat(features, *self.image_token_shape)
        )

    def _tokens(self, captions: Sequence[str], batch_size: int) -> Iterator[torch.Tensor]:
        """(b, context_length) token ids of each chunk of captions, on the encoder's device."""
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions; wrap a single one in a list.")
        for start in range(0, len(captions), batch_size):
            yield self.tokenize(list(captions[start : start + batch_size])).to(self.device)

    def _pixels(self, images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Each chunk of images as the model's input, on the encoder's device."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"encode_image takes float images of shape (B, 3, H, W) in [-1, 1], got "
                f"{images.dtype} of shape {tuple(images.shape)}; convert them first."
            )
        for start in range(0, images.shape[0], batch_size):
            yield self.preprocess(images[start : start + batch_size].to(self.device))

    def _pooled_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (b, E)

    def _pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (b, E)

    def _concat(self, chunks: list[torch.Tensor], *shape: int) -> torch.Tensor:
        """The chunks as one batch, or an empty batch of items of `shape` where none."""
        if not chunks:
            return torch.empty(0, *shape, device=self.device)
        return torch.cat(chunks)

    def fingerprint(self) -> str:
        """sha256 of the weights (every tensor's name, dtype, shape and bytes) and the image
        preprocessing: the same CLIP gives the same hex digest on any device, after any
        save/load. Computed once; the encoder's weights are frozen."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
                flat = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(flat.view(torch.uint8).numpy())
            digest.update(repr(self.preprocess).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint
