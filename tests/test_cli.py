"""The scripts' command line: a user's mistake prints its one sentence and exits with status 1;
a bug keeps its traceback (tokenizer/base/cli.py)."""

import errno

import pytest
from helpers import ROOT, run_script, save_tokenizer
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from generator.clip import build_small_clip, save_trained_clip
from tokenizer.base.cli import run_command
from tokenizer.base.files import WriteError

NO_LIGHTNING = ("lightning", "pytorch_lightning")


def test_an_unreadable_image_for_variations_is_one_sentence(run_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    result = run_script("variations.py", f"run_dir={run_dir}", f"image={notes}", "device=cpu")
    assert result.returncode == 1
    assert f"Error: Cannot read {notes} as an image" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Error executing job" not in result.stderr


def test_a_bad_device_for_sample_is_one_sentence(run_dir):
    result = run_script("sample.py", f"run_dir={run_dir}", "prompt=a red circle", "device=tpu")
    assert result.returncode == 1
    assert "Error: device='tpu' is not a device: use cpu, cuda or auto." in result.stderr
    assert "Traceback" not in result.stderr


def fail_with(error: Exception):
    def function(*args):
        raise error

    return function


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        FileNotFoundError("no file"),
        WriteError(errno.ENOSPC, "No space left: free space"),
    ],
)
def test_a_users_error_exits_with_its_sentence(error, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as raised:
        run_command(fail_with(error), "cfg")
    assert raised.value.code == f"Error: {error}"


def test_a_config_value_hydra_refused_exits_with_its_targets_sentence(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        raise ValueError("data: batch_size must be int, got 1.5.")
    except ValueError as cause:
        wrapped = InstantiationException("Error in call to target 'DataConfig'")
        wrapped.__cause__ = cause
    with pytest.raises(SystemExit, match=r"^Error: data: batch_size must be int, got 1\.5\.$"):
        run_command(fail_with(wrapped))


def test_a_bug_and_hydra_full_error_keep_the_traceback(monkeypatch):
    with pytest.raises(KeyError):
        run_command(fail_with(KeyError("a bug")))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="bad value"):
        run_command(fail_with(ValueError("bad value")))


def test_the_result_passes_through():
    assert run_command(lambda value: value * 2, 21) == 42


def test_encoding_and_sampling_never_load_lightning(run_dir, tmp_path):
    """Importing Lightning takes seconds, once for every such stage of a pipeline."""
    clip_config = instantiate(OmegaConf.load(ROOT / "conf" / "clip" / "tiny.yaml"), _convert_="all")
    save_tokenizer(tmp_path)
    save_trained_clip(build_small_clip(clip_config), clip_config, tmp_path / "clip")
    overrides = ["clip=tiny", "data.num_train=4", "data.num_val=2", "data.num_workers=0"]
    encoded = run_script("encode.py", f"run_dir={tmp_path}", *overrides, blocked=NO_LIGHTNING)
    assert encoded.returncode == 0, encoded.stderr[-3000:]
    assert (tmp_path / "encoded" / "manifest.json").is_file()
    out = tmp_path / "samples"
    sampled = run_script(
        "sample.py", f"run_dir={run_dir}", "prompt=a red circle", f"out={out}", blocked=NO_LIGHTNING
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (out / "grid.png").is_file()
    stopped = run_script("train_tokenizer.py", f"run_dir={tmp_path}", blocked=NO_LIGHTNING)
    assert "import of lightning halted" in stopped.stderr  # the block holds where it is needed
