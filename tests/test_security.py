"""Untrusted run directories: crafted configs, pickled payloads, newer formats, missing parts.

A run directory may be downloaded from anywhere. Loading one reads JSON and safetensors only and
never unpickles; builds no model its config.json describes before the weights file vouches for
every tensor (tokenizer/base/weights.py); and refuses what it cannot use with a sentence that says
what to do.
"""

import contextlib
import io
import json
import os
import pickle
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from helpers import TINY, FakeCLIP, run_script, shapes_config
from safetensors.torch import load_file, save_file
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from generator.clip import CLIPConfig, load_clip
from generator.clip.module import CLIPModule
from generator.conditioning import ConditionConfig
from generator.data import load_manifest
from generator.encoding import encode_run
from generator.export import load_generator
from generator.gpt import GPTConfig
from generator.module import GeneratorModule
from generator.pipeline import DEFAULT_OPTIONS, Pipeline
from tokenizer import VQGAN, VQGANConfig
from tokenizer.base.optim import OptimConfig
from tokenizer.base.weights import UNSAVED_TENSORS
from tokenizer.losses import LossConfig
from tokenizer.module import TokenizerModule

ROOT = Path(__file__).resolve().parents[1]
LOADERS = {  # each exported part of a run, loaded from its folder
    "tokenizer": VQGAN.from_pretrained,
    "generator": load_generator,
    "clip": lambda folder: load_clip(CLIPConfig(source="trained", checkpoint=str(folder))),
}


def part_copy(run_dir: Path, tmp_path: Path, part: str) -> Path:
    copy = tmp_path / part
    shutil.copytree(run_dir / part, copy)
    return copy


def edit_json(path: Path, changes: dict) -> None:
    """Set fields of a JSON file; a dotted name sets a field of a nested object."""
    values = json.loads(path.read_text())
    for name, value in changes.items():
        *parents, leaf = name.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    path.write_text(json.dumps(values))


def replace_weights(folder: Path, write: Callable[[dict, Path], None]) -> None:
    """Write the part's weights anew with `write(tensors, path)`, beside the memory-mapped
    original, then move the new file over it."""
    new = folder / "new-weights"
    write(load_file(folder / "model.safetensors"), new)
    os.replace(new, folder / "model.safetensors")


class Built(NamedTuple):
    real: list[int]  # the size in bytes of each parameter and buffer built for real
    meta: list[int]  # and of each one built on the meta device, without memory


@contextlib.contextmanager
def tensors_built() -> Iterator[Built]:
    """The parameters and buffers modules register meanwhile."""
    built = Built([], [])

    def record(module, name, tensor) -> None:
        if tensor is not None:
            sizes = built.meta if tensor.is_meta else built.real
            sizes.append(tensor.numel() * tensor.element_size())

    handles = [
        register_module_parameter_registration_hook(record),
        register_module_buffer_registration_hook(record),
    ]
    try:
        yield built
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Crafted config.json and weights


@pytest.mark.parametrize("part", LOADERS)
def test_an_exported_part_loads_and_is_built_for_real(run_dir, tmp_path, part):
    folder = part_copy(run_dir, tmp_path, part)
    with tensors_built() as built:
        LOADERS[part](folder)
    weights = load_file(folder / "model.safetensors")
    assert sum(built.real) >= sum(t.numel() * t.element_size() for t in weights.values())


CRAFTED = [  # sizes that would allocate hundreds of MB, or far more than any machine holds
    ("tokenizer", {"quantizer.num_codes": 10**7}),
    ("tokenizer", {"quantizer.num_codes": 10**12}),
    ("tokenizer", {"base_channels": 256}),
    ("tokenizer", {"num_res_blocks": 1000}),  # thousands of small tensors
    ("tokenizer", {"quantizer.usage_window": 3 * 10**7}),  # a buffer that is never saved
    ("generator", {"vocab_size": 10**6}),
    ("generator", {"dim": 2**30}),
    ("generator", {"num_layers": 1000}),
    ("clip", {"vision_width": 2048}),
    ("clip", {"context_length": 5000}),  # a causal mask that is never saved
]


@pytest.mark.parametrize(
    ("part", "changes"), CRAFTED, ids=[f"{part}-{next(iter(c))}" for part, c in CRAFTED]
)
def test_a_crafted_config_is_refused_before_its_model_is_built(run_dir, tmp_path, part, changes):
    folder = part_copy(run_dir, tmp_path, part)
    edit_json(folder / "config.json", changes)
    with (
        tensors_built() as built,
        pytest.raises(ValueError, match="does not match .*config.json.*export"),
    ):
        LOADERS[part](folder)
    assert built.real == []  # the weights file decided, before anything was allocated
    saved = load_file(folder / "model.safetensors")
    assert len(built.meta) <= len(saved) + UNSAVED_TENSORS + 1  # nor built long on the meta device


def test_weights_of_another_dtype_are_refused(run_dir, tmp_path):
    folder = part_copy(run_dir, tmp_path, "tokenizer")

    def double_codebook(tensors: dict, path: Path) -> None:
        save_file({**tensors, "quantizer.codebook": tensors["quantizer.codebook"].double()}, path)

    replace_weights(folder, double_codebook)
    with pytest.raises(ValueError, match=r"tensors \['quantizer.codebook'\] differ"):
        VQGAN.from_pretrained(folder)


@pytest.mark.parametrize("part", LOADERS)
def test_a_pickle_named_model_safetensors_is_refused_unread(run_dir, tmp_path, part):
    folder = part_copy(run_dir, tmp_path, part)
    replace_weights(folder, torch.save)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LOADERS[part](folder)


@pytest.mark.parametrize("part", LOADERS)
def test_config_fields_that_name_code_are_refused(run_dir, tmp_path, monkeypatch, part):
    def forbidden(*args, **kwargs):
        raise AssertionError("a config.json ran a command")

    monkeypatch.setattr(os, "system", forbidden)
    folder = part_copy(run_dir, tmp_path, part)
    edit_json(folder / "config.json", {"_target_": "os.system", "_args_": ["touch pwned"]})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['_args_', '_target_'\]"):
        LOADERS[part](folder)


@pytest.mark.parametrize(
    ("part", "file"),
    [
        ("tokenizer", "config.json"),
        ("generator", "config.json"),
        ("generator", "provenance.json"),
        ("clip", "config.json"),
    ],
)
def test_a_config_of_a_newer_format_is_refused(run_dir, tmp_path, part, file):
    folder = part_copy(run_dir, tmp_path, part)
    edit_json(folder / file, {"format_version": 2})
    with pytest.raises(ValueError, match="format version 2; .* Upgrade the package"):
        LOADERS[part](folder)


def test_encoded_shards_of_a_newer_format_are_refused(encoded_run):
    edit_json(encoded_run / "encoded" / "manifest.json", {"format_version": 99})
    with pytest.raises(ValueError, match="format version 99; .* run scripts/encode.py"):
        load_manifest(encoded_run)


# ---------------------------------------------------------------------------------------------
# Pickles


def test_loading_a_run_never_unpickles(run_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a file of the run directory was unpickled")

    for owner, name in [
        (torch, "load"),
        (torch.serialization, "load"),
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
    ]:
        monkeypatch.setattr(owner, name, forbidden)
    pipeline = Pipeline.from_run_dir(run_dir)
    assert pipeline.text_to_image(
        "a red circle", 1, replace(DEFAULT_OPTIONS, seed=0)
    ).images.shape == (1, 3, 32, 32)


class Payload:
    """Runs a shell command when unpickled, as a crafted checkpoint would."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_carrying_a_pickled_payload_is_refused_on_resume(tmp_path):
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "tokenizer" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    payload = Payload(f"touch {shlex.quote(str(marker))}")
    torch.save({"state_dict": {}, "global_step": 3, "payload": payload}, checkpoint)
    result = run_script("train_tokenizer.py", f"run_dir={run_dir}", *TINY, "trainer.max_steps=2")
    assert result.returncode != 0 and not marker.exists()
    assert "is not a checkpoint this project wrote" in result.stderr
    assert f"delete {checkpoint.parent} to train the tokenizer from scratch" in result.stderr
    torch.load(checkpoint, weights_only=False)  # the payload is real: unpickling runs it
    assert marker.exists()


STAGE_MODULES = {  # each stage's LightningModule, built as its training script builds it
    "tokenizer": lambda: TokenizerModule.from_configs(
        VQGANConfig.tiny(), LossConfig(perceptual_weight=0.0), OptimConfig(), image_dir="images"
    ),
    "generator": lambda: GeneratorModule.from_configs(
        GPTConfig.preset("tiny", vocab_size=64, grid_size=(8, 8), clip_dim=16),
        OptimConfig(),
        ConditionConfig("text"),
        ema_decay=0.9,
        tokenizer_fingerprint="tokenizer",
        clip_fingerprint="clip",
    ),
    "clip": lambda: CLIPModule.from_configs(CLIPConfig(source="trained"), OptimConfig()),
}


def is_plain(value) -> bool:
    """Built of None, bool, int, float, str, lists, tuples and str-keyed dicts only."""
    if isinstance(value, dict):
        return all(isinstance(key, str) and is_plain(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return all(map(is_plain, value))
    return value is None or isinstance(value, bool | int | float | str)


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_checkpoint_hyperparameters_are_plain_values(stage):
    """What Lightning saves as a checkpoint's hyper_parameters loads with weights_only=True,
    so that a resume never needs the unpickler."""
    hyperparameters = dict(STAGE_MODULES[stage]().hparams)
    assert is_plain(hyperparameters), hyperparameters
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": hyperparameters}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["hyper_parameters"] == hyperparameters


# ---------------------------------------------------------------------------------------------
# Missing parts


def test_training_the_generator_without_encoded_shards_says_to_encode(run_dir):
    with pytest.raises(FileNotFoundError, match="run scripts/encode.py run_dir="):
        load_manifest(run_dir)


def test_shards_without_the_tokenizer_that_made_them_are_refused(encoded_run):
    shutil.rmtree(encoded_run / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .* put it back or train"):
        load_manifest(encoded_run)


def test_encoding_without_a_tokenizer_says_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/train_tokenizer.py"):
        encode_run(tmp_path, shapes_config(), FakeCLIP())
    assert not (tmp_path / "encoded").exists()
