"""Shared fixtures: small run directories with a tokenizer and encoded shards."""

from pathlib import Path

import pytest
from test_encode import FakeCLIP, save_tokenizer, shapes_config
from test_pipeline import save_clip, save_random_generator

from generator.encoding import encode_run


def make_encoded_run(run_dir: Path, num_train: int = 16, num_val: int = 4) -> Path:
    """RUN/tokenizer (the tiny VQGAN: an 8x8 grid of 64 codes) and RUN/encoded, whose
    embeddings come from test_encode's FakeCLIP (16 wide)."""
    save_tokenizer(run_dir)
    config = shapes_config(num_train=num_train, num_val=num_val)
    encode_run(run_dir, config, FakeCLIP(), shard_size=8)
    return run_dir


@pytest.fixture
def encoded_run(tmp_path) -> Path:
    return make_encoded_run(tmp_path / "run")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A complete run: RUN/tokenizer (tiny VQGAN, 8x8 codes of 64), RUN/clip (tiny CLIP) and
    RUN/generator (a random tiny GPT), made by test_pipeline's helpers."""
    run_dir = tmp_path_factory.mktemp("run")
    save_tokenizer(run_dir)
    save_clip(run_dir)
    save_random_generator(run_dir)
    return run_dir
