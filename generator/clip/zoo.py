"""CLIPs of open_clip: a model of its zoo by name and tag (source=pretrained), downloaded once
into open_clip's cache, or a local checkpoint file of an open_clip architecture (source=file).
Nothing here unpickles: weights are read from safetensors, or with
`torch.load(weights_only=True)` inside open_clip.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

import open_clip
from torch import nn

from generator.clip.config import CLIPConfig
from generator.clip.encoder import CLIPEncoder, ImagePreprocess

HF_SAFETENSORS_NAME = "open_clip_model.safetensors"  # what open_clip's hub repos publish


class MissingCLIPWeightsError(FileNotFoundError):
    """Pretrained CLIP weights are neither in open_clip's cache nor downloadable."""


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


def load_file(config: CLIPConfig) -> CLIPEncoder:
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


def load_pretrained(config: CLIPConfig) -> CLIPEncoder:
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
