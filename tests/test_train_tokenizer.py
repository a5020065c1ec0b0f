"""Stage one through its Hydra entry points: train, export, resume after a kill, evaluate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose_config, load_script, read_checkpoint, run_script

from tokenizer import VQGAN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script(
        "train_tokenizer.py",
        f"run_dir={run_dir}",
        *TINY,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "checkpoint_every_n_steps=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_training_exports_a_tokenizer_that_loads(trained_run):
    model = VQGAN.from_pretrained(trained_run / "tokenizer")
    codes = model.encode(torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8)
    grids = sorted((trained_run / "logs" / "tokenizer" / "images").glob("*.png"))
    assert [p.name for p in grids] == [
        "reconstructions_step0000003.png",
        "reconstructions_step0000006.png",
    ]
    metrics = (trained_run / "logs" / "tokenizer" / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/l1", "train/adaptive_weight", "train/usage", "val/psnr", "val/ssim"):
        assert key in metrics
    checkpoint = read_checkpoint(trained_run / "checkpoints" / "tokenizer" / "last.ckpt")
    assert checkpoint["global_step"] == 6


def test_rerun_after_completion_resumes_instead_of_starting_over(trained_run, capsys):
    overrides = [f"run_dir={trained_run}", *TINY, "trainer.max_steps=8"]
    load_script("train_tokenizer.py").train(compose_config("train_tokenizer", overrides))
    assert "Resuming from" in capsys.readouterr().out
    checkpoint = read_checkpoint(trained_run / "checkpoints" / "tokenizer" / "last.ckpt")
    assert checkpoint["global_step"] == 8
    adam_steps = checkpoint["optimizer_states"][0]["state"][0]["step"]
    assert int(adam_steps) == 8, "the optimiser state was not restored"


def test_killed_training_continues_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"

    def command(max_steps: int) -> list[str]:
        script = str(ROOT / "scripts" / "train_tokenizer.py")
        settings = [f"trainer.max_steps={max_steps}", "trainer.val_check_interval=1000"]
        return [
            sys.executable,
            script,
            f"run_dir={run_dir}",
            *TINY,
            *settings,
            "checkpoint_every_n_steps=4",
        ]

    last = run_dir / "checkpoints" / "tokenizer" / "last.ckpt"
    process = subprocess.Popen(
        command(400), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not last.is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let it step on past the checkpoint before the kill
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert last.is_file(), process.stderr.read().decode()[-3000:]
    killed_at = read_checkpoint(last)["global_step"]
    assert killed_at >= 4 and killed_at % 4 == 0

    target = killed_at + 2
    resumed = subprocess.run(
        command(target),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {last}" in resumed.stdout
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == target
    assert int(checkpoint["optimizer_states"][0]["state"][0]["step"]) == target


def test_evaluate_prints_json_with_the_documented_keys(trained_run):
    result = run_script(
        "evaluate.py", f"run_dir={trained_run}", "max_images=16", "data.num_workers=0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert printed == json.loads((trained_run / "eval.json").read_text())
    tokenizer = printed["tokenizer"]
    assert set(tokenizer) == {
        "num_images",
        "psnr",
        "ssim",
        "lpips",
        "usage",
        "perplexity",
        "num_codes_counted",
        "frechet_distance",
        "checker_accuracy_originals",
        "checker_accuracy_reconstructions",
        "checker_ratio",
        "checker_ratio_by_pair",
    }
    assert tokenizer["num_images"] == 16 and tokenizer["num_codes_counted"] == 16 * 64
    assert 0 < tokenizer["usage"] <= 1 and tokenizer["checker_accuracy_originals"] == 1.0


def test_evaluate_adds_clip_retrieval_and_frechet_distance_when_the_run_has_a_clip(
    trained_run, tmp_path, capsys
):
    from generator.clip import CLIPConfig, build_small_clip, save_trained_clip

    run_dir = tmp_path / "run"
    (run_dir / "tokenizer").mkdir(parents=True)
    for file in (trained_run / "tokenizer").iterdir():
        (run_dir / "tokenizer" / file.name).write_bytes(file.read_bytes())
    config = CLIPConfig(
        source="trained",
        embed_dim=16,
        vision_width=16,
        vision_layers=1,
        vision_heads=1,
        text_width=16,
        text_layers=1,
        text_heads=1,
    )
    save_trained_clip(build_small_clip(config), config, run_dir / "clip")
    overrides = [f"run_dir={run_dir}", "max_images=16", "data.num_workers=0"]
    load_script("evaluate.py").evaluate(compose_config("evaluate", overrides))
    stdout = capsys.readouterr().out
    printed = json.loads(stdout[stdout.index("{") :])
    assert printed["tokenizer"]["frechet_distance"] >= 0
    seen = printed["clip_retrieval"]["seen"]
    assert seen["num_images"] > 0
    assert 0 <= seen["image_to_text_top1"] <= seen["image_to_text_top5"] <= 1
    assert "held_out" in printed["clip_retrieval"]  # 16 images may hold no held-out pair
