"""Which CLIP to load: `CLIPConfig` names the source of the weights (open_clip's zoo, a local
file, or the small CLIP trained here) and, for the small one, its size. Plain fields, checked
when built, so Hydra can fill it and JSON can hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizer.base.configs import checked_config

SOURCES = ("pretrained", "file", "trained")
CONFIG_KIND = "clip"  # the kind written into every CLIP config's JSON
POS_EMBEDS = ("learnable", "sin_cos_2d")  # open_clip's position embeddings of image patches


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
    conv_stem: int = 0  # > 0: a convolutional stem from this many channels embeds the patches
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
        if self.conv_stem < 0 or (self.conv_stem and self.patch_size & (self.patch_size - 1)):
            raise ValueError(
                f"clip.conv_stem={self.conv_stem} with clip.patch_size={self.patch_size}: the "
                "stem halves the image until it is the patch grid, so use a patch size that is a "
                "power of two (or conv_stem=0 for the plain patch embedding)."
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
