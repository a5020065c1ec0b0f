"""The small CLIP trained here (source=trained): open_clip's CLIP class at the size of a
`CLIPConfig`, its tokenizer, and its folder RUN/clip (`model.safetensors` + `config.json`),
written by scripts/train_clip.py and read back as a `CLIPEncoder`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from generator.clip.config import CONFIG_KIND, CLIPConfig
from generator.clip.encoder import OPENAI_MEAN, OPENAI_STD, CLIPEncoder, ImagePreprocess
from generator.clip.stem import ConvStem
from tokenizer.base.configs import load_config, save_config
from tokenizer.base.run_dir import CONFIG_FILE, WEIGHTS_FILE
from tokenizer.base.weights import load_checked_model, save_weights


def clip_tokenizer(config: CLIPConfig) -> open_clip.SimpleTokenizer:
    """open_clip's BPE tokenizer at the config's context length."""
    return open_clip.SimpleTokenizer(context_length=config.context_length)


class CachedTokenizer:
    """A tokenizer that keeps the tokens of the first `size` distinct captions it reads.

    Training reads each caption many times: open_clip's tokenizer took about 6% of a shapes
    CLIP's training step (33 ms for its 500 captions and twins on one core), the lookups take
    a hundredth of that.
    """

    def __init__(self, tokenizer: open_clip.SimpleTokenizer, size: int = 2**17) -> None:
        self.tokenizer, self.size = tokenizer, size
        self.tokens: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """(len(captions), context_length) token ids, as the tokenizer gives them."""
        return torch.stack([self._tokens(caption) for caption in captions])

    def _tokens(self, caption: str) -> torch.Tensor:
        tokens = self.tokens.get(caption)
        if tokens is None:
            tokens = self.tokenizer([caption])[0]
            if len(self.tokens) < self.size:
                self.tokens[caption] = tokens
        return tokens


def build_small_clip(config: CLIPConfig) -> open_clip.CLIP:
    """open_clip's CLIP class at the config's size, vocabulary from open_clip's tokenizer, and the
    convolutional stem in place of its patch embedding where the config asks for one."""
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
    if config.conv_stem:
        model.visual.conv1 = ConvStem(config.conv_stem, config.vision_width, config.patch_size)
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


def load_trained(config: CLIPConfig, run_dir: Path | None) -> CLIPEncoder:
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
