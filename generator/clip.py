"""CLIP through open_clip: one encoder interface over three sources of weights.

    pretrained  a model of open_clip's zoo by name and tag (ViT-B-32 / openai, ...), downloaded
                once into open_clip's cache
    file        a local checkpoint file of an open_clip model (safetensors, or a plain state dict)
    trained     a small CLIP trained by scripts/train_clip.py, read from RUN/clip/

Whatever the source, `load_clip` returns a `CLIPEncoder` that turns captions and images
(tensors in [-1, 1]) into l2-normalised embeddings, with the model's own tokenizer and its own
resize + mean/std normalisation done as tensor ops on the batch. Nothing here unpickles: weights
are read from safetensors, or with `torch.load(weights_only=True)` inside open_clip.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.base.configs import checked_config, load_config, save_config
from tokenizer.base.weights import load_checked_model, save_weights

SOURCES = ("pretrained", "file", "trained")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_KIND = "clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default image normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
POS_EMBEDS = ("learnable", "sin_cos_2d")  # open_clip's position embeddings of image patches
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
HF_SAFETENSORS_NAME = "open_clip_model.safetensors"  # what open_clip's hub repos publish


class MissingCLIPWeightsError(FileNotFoundError):
    """Pretrained CLIP weights are neither in open_clip's cache nor downloadable."""


@checked_config("clip")
@dataclass
class CLIPConfig:
    """Which CLIP to load. Plain fields, so Hydra can fill it and JSON can hold it."""

    source: str  # one of SOURCES
    model_name: str = "ViT-B-32"  # open_clip architecture (pretrained and file)
    pretrained: str = "openai"  # open_clip zoo tag (pretrained)
    checkpoint: str = ""  # file: the weights file; trained: the folder train_clip wrote (RUN/clip)
    cache_dir: str = ""  # where open_clip caches downloads; "" is its default
    quick_gelu: bool = False  # file: the OpenAI weights need QuickGELU; the zoo tag sets it itself
    # The small CLIP trained here (source=trained): open_clip's CLIP class at this size.
    # The defaults are the shapes preset (conf/clip/shapes.yaml).
    embed_dim: int = 64
    image_size: int = 32  # CLIP's input size; the shapes images need no resize at 32
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_pos_embed: str = "sin_cos_2d"  # fixed 2D sine-cosine positions, or "learnable"
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 24  # tokens per caption, start and end included; longer ones are cut

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"clip.source is {self.source!r}: use one of {SOURCES}.")
        if self.source == "pretrained" and not (self.model_name and self.pretrained):
            raise ValueError(
                "clip.source=pretrained needs clip.model_name and clip.pretrained (a zoo tag), "
                "for example model_name=ViT-B-32 pretrained=openai."
            )
        if self.source == "file" and not (self.model_name and self.checkpoint):
            raise ValueError(
                "clip.source=file needs clip.model_name (the open_clip architecture) and "
                "clip.checkpoint (the path of its weights file)."
            )
        sizes = {
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "vision_width": self.vision_width,
            "vision_layers": self.vision_layers,
            "vision_heads": self.vision_heads,
            "text_width": self.text_width,
            "text_layers": self.text_layers,
            "text_heads": self.text_heads,
        }
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"clip.{name} must be at least 1, got {value}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"clip.image_size={self.image_size} is not a multiple of clip.patch_size="
                f"{self.patch_size}: choose a patch size that divides the image size."
            )
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(
                    f"clip.{tower}_width={width} is not divisible by clip.{tower}_heads={heads}: "
                    "choose a width that is a multiple of the head count."
                )
        if self.vision_pos_embed not in POS_EMBEDS:
            raise ValueError(
                f"clip.vision_pos_embed is {self.vision_pos_embed!r}: use one of {POS_EMBEDS}."
            )
        if self.context_length < 3:
            raise ValueError(
                f"clip.context_length must be at least 3 (start, one token, end), got "
                f"{self.context_length}."
            )


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
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions; wrap a single one in a list.")
        chunks = []
        for start in range(0, len(captions), batch_size):
            tokens = self.tokenize(list(captions[start : start + batch_size])).to(self.device)
            features = self.model.encode_text(tokens)  # (b, E)
            chunks.append(F.normalize(features.float(), dim=-1))
        return self._concat(chunks)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (B, 3, H, W) float in [-1, 1], any size -> (B, E) unit vectors."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"encode_image takes float images of shape (B, 3, H, W) in [-1, 1], got "
                f"{images.dtype} of shape {tuple(images.shape)}; convert them first."
            )
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            pixels = self.preprocess(images[start : start + batch_size].to(self.device))
            features = self.model.encode_image(pixels)  # (b, E)
            chunks.append(F.normalize(features.float(), dim=-1))
        return self._concat(chunks)

    def _concat(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        if not chunks:
            return torch.empty(0, self.embed_dim, device=self.device)
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


# ---------------------------------------------------------------------------------------------
# The small CLIP trained here


def clip_tokenizer(config: CLIPConfig) -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer at the config's context length."""
    return open_clip.SimpleTokenizer(context_length=config.context_length)


def build_small_clip(config: CLIPConfig) -> open_clip.CLIP:
    """open_clip's CLIP class at the config's size, vocabulary from open_clip's tokenizer."""
    vision = open_clip.CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.vision_width // config.vision_heads,
        patch_size=config.patch_size,
        image_size=config.image_size,
        pos_embed_type=config.vision_pos_embed,
    )
    text = open_clip.CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=clip_tokenizer(config).vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    model = open_clip.CLIP(config.embed_dim, vision, text, init_logit_scale=math.log(1 / 0.07))
    open_clip.set_model_preprocess_cfg(
        model,
        {
            "size": config.image_size,
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    )
    return model


def save_trained_clip(model: open_clip.CLIP, config: CLIPConfig, directory: str | Path) -> Path:
    """Write `model.safetensors` and `config.json` into `directory` (RUN/clip), each atomically."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_FILE)
    saved = dataclasses.replace(config, source="trained", checkpoint="")
    save_config(saved, directory / CONFIG_FILE, kind=CONFIG_KIND)
    return directory


def _trained_folder(config: CLIPConfig, run_dir: Path | None) -> Path:
    if config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        return path.parent if path.is_file() else path
    if run_dir is None:
        raise ValueError(
            "clip.source=trained needs the folder scripts/train_clip.py wrote: pass run_dir, "
            "or set clip.checkpoint=RUN/clip."
        )
    return Path(run_dir) / "clip"


def _load_trained(config: CLIPConfig, run_dir: Path | None) -> CLIPEncoder:
    directory = _trained_folder(config, run_dir)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"No trained CLIP at {directory} (no {WEIGHTS_FILE}): train one with "
            f"`python scripts/train_clip.py run_dir=RUN`, or set clip.checkpoint to the folder "
            "it wrote."
        )
    saved = load_config(CLIPConfig, directory / CONFIG_FILE, kind=CONFIG_KIND)
    fix = "export the CLIP again with scripts/train_clip.py."
    model = load_checked_model(
        lambda: build_small_clip(saved), weights, directory / CONFIG_FILE, fix
    )
    return CLIPEncoder(
        model, clip_tokenizer(saved), ImagePreprocess.of(model), saved, saved.embed_dim
    )


# ---------------------------------------------------------------------------------------------
# open_clip's zoo and checkpoint files


def _check_model_name(name: str) -> None:
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"clip.model_name={name!r} is not an open_clip architecture{hint}: choose one of "
            "open_clip.list_models()."
        )


def _download_url(tag_config: dict) -> str:
    """Where a zoo tag's weights can be fetched by hand, safetensors preferred."""
    hub = tag_config.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # "org/name/" names the repo's default weights
        return f"https://huggingface.co/{repo}/resolve/main/{filename or HF_SAFETENSORS_NAME}"
    return tag_config.get("url", "") or tag_config.get("file", "")


def _open_clip_model(
    config: CLIPConfig, checkpoint: str, quick_gelu: bool, preprocess: dict | None = None
) -> nn.Module:
    """open_clip's model `config.model_name` with the weights in `checkpoint` (a file)."""
    try:
        return open_clip.create_model(
            config.model_name,
            pretrained=checkpoint,
            force_quick_gelu=quick_gelu,
            force_preprocess_cfg=preprocess,
            cache_dir=config.cache_dir or None,
            weights_only=True,
        )
    except Exception as error:  # torch, safetensors and open_clip raise many types here
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ValueError(
            f"Could not load {checkpoint} as open_clip {config.model_name} weights "
            f"({type(error).__name__}: {reason}): set clip.model_name to the checkpoint's "
            "architecture and give an open_clip state dict (.safetensors, or a .pt/.bin of plain "
            "tensors; pickled objects and TorchScript files are refused)."
        ) from None


def _embed_dim(model_name: str) -> int:
    return int(open_clip.get_model_config(model_name)["embed_dim"])


def _load_file(config: CLIPConfig) -> CLIPEncoder:
    _check_model_name(config.model_name)
    path = Path(config.checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"No CLIP checkpoint file at {path}: set clip.checkpoint to the path of an open_clip "
            f"weights file for {config.model_name} (.safetensors preferred)."
        )
    model = _open_clip_model(config, str(path), config.quick_gelu)
    return CLIPEncoder(
        model,
        open_clip.get_tokenizer(config.model_name),
        ImagePreprocess.of(model),
        config,
        _embed_dim(config.model_name),
    )


def _load_pretrained(config: CLIPConfig) -> CLIPEncoder:
    name, tag = config.model_name, config.pretrained
    _check_model_name(name)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ValueError(
            f"open_clip has no pretrained tag {tag!r} for {name}: set clip.pretrained to one of "
            f"{tags}, or use clip.source=file with your own checkpoint."
        )
    tag_config = open_clip.get_pretrained_cfg(name, tag)
    quick_gelu = config.quick_gelu or bool(tag_config.get("quick_gelu", False))
    try:
        path = open_clip.download_pretrained(tag_config, cache_dir=config.cache_dir or None)
    except Exception as error:  # no network, no cache, hub errors: all end the same way
        flag = " clip.quick_gelu=true" if quick_gelu else ""
        raise MissingCLIPWeightsError(
            f"open_clip's {name}/{tag} weights are not cached and could not be downloaded "
            f"({type(error).__name__}): on a machine with internet download "
            f"{_download_url(tag_config)}, copy the file here and set clip.source=file "
            f"clip.model_name={name}{flag} clip.checkpoint=PATH_TO_THAT_FILE."
        ) from None
    model = _open_clip_model(config, path, quick_gelu, preprocess=tag_config)
    resolved = dataclasses.replace(config, quick_gelu=quick_gelu)
    return CLIPEncoder(
        model, open_clip.get_tokenizer(name), ImagePreprocess.of(model), resolved, _embed_dim(name)
    )


ENCODED_CONFIG_FILE = "clip.json"  # in RUN/encoded: the CLIP that made the embeddings


def record_encoding_clip(config: CLIPConfig, encoded_dir: str | Path) -> Path:
    """Keep beside the shards the config of the CLIP that embedded them, so that the generator
    trained on them can name its CLIP without the user typing it again."""
    return save_config(config, Path(encoded_dir) / ENCODED_CONFIG_FILE, kind=CONFIG_KIND)


def encoding_clip(encoded_dir: str | Path) -> CLIPConfig | None:
    """The config `record_encoding_clip` kept, or None for shards encoded before it did."""
    path = Path(encoded_dir) / ENCODED_CONFIG_FILE
    return load_config(CLIPConfig, path, kind=CONFIG_KIND) if path.is_file() else None


def load_clip(
    config: CLIPConfig,
    run_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> CLIPEncoder:
    """The CLIP a config names, frozen, on `device`. `run_dir` locates RUN/clip for a CLIP
    trained here when `config.checkpoint` is empty."""
    if config.source == "pretrained":
        encoder = _load_pretrained(config)
    elif config.source == "file":
        encoder = _load_file(config)
    else:
        encoder = _load_trained(config, Path(run_dir) if run_dir is not None else None)
    return encoder.to(device)
