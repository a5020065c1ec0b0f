"""Shared fixtures: small run directories with a tokenizer and encoded shards (made by helpers)."""

from pathlib import Path

import pytest
from helpers import make_encoded_run, save_clip, save_random_generator, save_tokenizer


@pytest.fixture
def encoded_run(tmp_path) -> Path:
    return make_encoded_run(tmp_path / "run")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A complete run: RUN/tokenizer (tiny VQGAN, 8x8 codes of 64), RUN/clip (tiny CLIP) and
    RUN/generator (a random tiny GPT)."""
    run_dir = tmp_path_factory.mktemp("run")
    save_tokenizer(run_dir)
    save_clip(run_dir)
    save_random_generator(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def openmoji(tmp_path_factory) -> Path:
    """A real captioned folder: the first 12 OpenMoji drawings of each of its 12 groups, 64 px,
    OUT/<group>/<hexcode>.png beside a .txt caption (tests/openmoji.py)."""
    from openmoji import openmoji_folder

    return openmoji_folder(tmp_path_factory.mktemp("openmoji"), image_size=64, max_per_group=12)
