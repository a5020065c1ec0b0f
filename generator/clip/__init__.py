"""The CLIP stage: one encoder interface over open_clip, whatever the source of its weights.

    pretrained  a model of open_clip's zoo by name and tag (ViT-B-32 / openai, ...), downloaded
                once into open_clip's cache (zoo.py)
    file        a local checkpoint file of an open_clip model (safetensors, or a plain state dict)
                (zoo.py)
    trained     a small CLIP trained by scripts/train_clip.py, read from RUN/clip/ (trained.py)

Whatever the source, `load_clip` (loading.py) returns a `CLIPEncoder` (encoder.py) that turns
captions and images (tensors in [-1, 1]) into l2-normalised embeddings, and into each tower's
per-token features (towers.py says where open_clip keeps them). The small CLIP is
trained here by `CLIPModule` (module.py) on captioned images batched without false negatives
(data.py), with its captions' swapped twins as hard negatives (loss.py), and scored by retrieval
and the swap probe (evaluation.py). `CLIPConfig` (config.py) names which CLIP.
"""

from generator.clip.config import CLIPConfig
from generator.clip.encoder import (
    CLIPEncoder,
    ImagePreprocess,
    ImageTokens,
    TextTokens,
    text_feature_shape,
)
from generator.clip.loading import encoding_clip, load_clip, record_encoding_clip
from generator.clip.trained import build_small_clip, clip_tokenizer, save_trained_clip
from generator.clip.zoo import MissingCLIPWeightsError

__all__ = [
    "CLIPConfig",
    "CLIPEncoder",
    "ImagePreprocess",
    "ImageTokens",
    "MissingCLIPWeightsError",
    "TextTokens",
    "build_small_clip",
    "clip_tokenizer",
    "encoding_clip",
    "load_clip",
    "record_encoding_clip",
    "save_trained_clip",
    "text_feature_shape",
]
