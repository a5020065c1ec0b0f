"""Run directories written by earlier versions still load and sample the same codes.

tests/data/run_bf7b76f/ is a tiny run (tokenizer, CLIP trained here, random generator) written
by the code at commit bf7b76f, with the codes that code sampled from it for fixed seeds in
expected_codes.json. Loading must accept the files as they are and sampling must reproduce
those codes exactly.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from generator.pipeline import DEFAULT_OPTIONS, Pipeline

OLD_RUNS = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A copy, so that nothing a test does can change the kept files."""
    return Path(shutil.copytree(OLD_RUNS / "run_bf7b76f", tmp_path_factory.mktemp("old") / "run"))


def test_an_old_run_samples_the_codes_it_sampled_then(old_run):
    expected = json.loads((old_run / "expected_codes.json").read_text())
    pipeline = Pipeline.from_run_dir(old_run)
    wanted = expected["text_to_image"]
    options = replace(DEFAULT_OPTIONS, seed=wanted["seed"], top_k=wanted["top_k"])
    generated = pipeline.text_to_image(wanted["prompts"], wanted["num_images"], options)
    assert generated.codes.tolist() == wanted["codes"]

    wanted = expected["variations"]
    torch.manual_seed(wanted["sources_seed"])
    sources = torch.rand(2, 3, 32, 32) * 2 - 1
    options = replace(DEFAULT_OPTIONS, seed=wanted["seed"], cfg_scale=wanted["cfg_scale"])
    varied = pipeline.variations(
        sources, wanted["num_images"], options, keep_rows=wanted["keep_rows"]
    )
    assert varied.codes.tolist() == wanted["codes"]
