"""`load_clip`: the CLIP a config names, from whichever of the three sources, as a frozen
`CLIPEncoder`; and the record, beside encoded shards, of the CLIP that embedded them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generator.clip.config import CONFIG_KIND, CLIPConfig
from generator.clip.encoder import CLIPEncoder
from generator.clip.trained import load_trained
from generator.clip.zoo import load_file, load_pretrained
from tokenizer.base.configs import load_config, save_config

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
        encoder = load_pretrained(config)
    elif config.source == "file":
        encoder = load_file(config)
    else:
        encoder = load_trained(config, Path(run_dir) if run_dir is not None else None)
    return encoder.to(device)
