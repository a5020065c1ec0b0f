"""The exported generator, RUN/generator/, and the check that a run's parts belong together.

    RUN/generator/
      model.safetensors   the GPT's weights (the EMA weights where training kept an EMA)
      config.json         its GPTConfig
      provenance.json     which tokenizer and CLIP made the codes and embeddings it learnt from,
                          and which condition (text, image or mixed) it was trained on

A generator writes codes of one tokenizer given embeddings of one CLIP: beside another
tokenizer its codes decode to noise, and given another CLIP's embeddings it ignores the prompt.
`check_belongs_together` refuses such a run directory before any sampling. Loading reads JSON
and safetensors only, never a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from generator.clip import CLIPConfig
from generator.conditioning.inputs import CONDITIONS
from generator.gpt import GPT, GPTConfig
from generator.shards import TokenizerIdentity, tokenizer_differences
from tokenizer.base.configs import load_config, save_config
from tokenizer.base.run_dir import CONFIG_FILE, WEIGHTS_FILE, RunDir
from tokenizer.base.weights import load_checked_model, save_weights

PROVENANCE_FILE = "provenance.json"
CONFIG_KIND = "gpt"
PROVENANCE_KIND = "generator_provenance"


# Tensors generators held at the top level before the conditioning had a module of its own.
MOVED_TO_CONDITIONER = ("null_embedding", "condition_mlp.", "prefix_position")


def renamed(name: str) -> str:
    """A tensor's name in a generator file written before its move into `conditioner`."""
    return f"conditioner.{name}" if name.startswith(MOVED_TO_CONDITIONER) else name


class RunMismatchError(ValueError):
    """A generator beside a tokenizer or CLIP other than the ones it was trained with."""


@dataclass
class Provenance:
    tokenizer_fingerprint: str  # generator.shards.tokenizer_fingerprint of RUN/tokenizer
    clip_fingerprint: str  # CLIPEncoder.fingerprint() of the CLIP that made the embeddings
    condition: str  # "text", "image" or "mixed": what the generator was conditioned on
    clip: CLIPConfig | None = None  # how to load that CLIP; None where encode did not record it

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(
                f"condition must be one of {list(CONDITIONS)}, got {self.condition!r}."
            )


class LoadedGenerator(NamedTuple):
    model: GPT
    provenance: Provenance


def save_generator(model: GPT, provenance: Provenance, directory: str | Path) -> Path:
    """Write weights, config and provenance into `directory`, each file atomically."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_FILE)
    save_config(model.config, directory / CONFIG_FILE, kind=CONFIG_KIND)
    save_config(provenance, directory / PROVENANCE_FILE, kind=PROVENANCE_KIND)
    return directory


def load_generator(directory: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """The generator `save_generator` wrote, in eval mode on `device`."""
    directory = Path(directory)
    missing = [
        name
        for name in (WEIGHTS_FILE, CONFIG_FILE, PROVENANCE_FILE)
        if not (directory / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"no generator in {directory} ({', '.join(missing)} missing): run "
            f"scripts/train_generator.py run_dir={directory.parent} first."
        )
    config = load_config(GPTConfig, directory / CONFIG_FILE, kind=CONFIG_KIND)
    provenance = load_config(Provenance, directory / PROVENANCE_FILE, kind=PROVENANCE_KIND)
    fix = "export the generator again with scripts/train_generator.py."
    model = load_checked_model(
        lambda: GPT(config), directory / WEIGHTS_FILE, directory / CONFIG_FILE, fix, renamed
    )
    return LoadedGenerator(model.to(device).eval(), provenance)


def check_belongs_together(
    provenance: Provenance,
    run_dir: str | Path,
    clip_fingerprint: str | None = None,
    *,
    config: GPTConfig,
) -> None:
    """Refuse a generator (its `provenance` and `config`) whose tokenizer is not RUN/tokenizer,
    or whose CLIP is not the one with `clip_fingerprint` (skipped when None)."""
    run = RunDir(run_dir)
    trained_with = TokenizerIdentity(
        provenance.tokenizer_fingerprint, config.vocab_size, config.grid_size
    )
    differences = tokenizer_differences(
        run.tokenizer,
        trained_with,
        "the generator can only decode with the tokenizer it was trained with; put it back or "
        "train the whole run again.",
    )
    if differences:
        raise RunMismatchError(
            f"the generator in {run.generator} was trained with another tokenizer than "
            f"{run.tokenizer} (it has {', '.join(differences)}): put back the tokenizer it was "
            f"trained with, or encode again (scripts/encode.py run_dir={run_dir} overwrite=true) "
            f"and retrain the generator after deleting {run.checkpoints('generator')}."
        )
    if clip_fingerprint is not None and clip_fingerprint != provenance.clip_fingerprint:
        raise RunMismatchError(
            f"the generator in {run.generator} was trained on embeddings of another "
            "CLIP than the one configured: pick the clip config it was trained with (the one "
            f"scripts/encode.py used for {run.encoded})."
        )
