"""The whole pipeline through scripts/pipeline.py at test size, and the report it writes."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import chromium
from helpers import load_script
from PIL import Image

from tokenizer.base.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "tokenizer",
    "clip",
    "encode",
    "generator",
    "samples",
    "sources",
    "variations",
    "evaluate",
    "report",
)


def stage_settings(stage: str, **values: object) -> list[str]:
    """Overrides that set (or add) keys of one stage's settings; "__" stands for "."."""
    return [
        f"++stages.{stage}.settings.{key.replace('__', '.')}={value}"
        for key, value in values.items()
    ]


QUIET = {
    "trainer__limit_val_batches": 1,
    "trainer__log_every_n_steps": 1,
    "trainer__enable_progress_bar": "false",
}

# The quickstart experiment with every stage at test size.
TINY = [
    'common=["data.num_train=96","data.num_val=16","data.num_test=32","data.num_workers=0"]',
    *stage_settings(
        "tokenizer", tokenizer="tiny", trainer__max_steps=6, data__batch_size=8, **QUIET
    ),
    *stage_settings(
        "clip", clip="tiny", trainer__max_steps=6, data__batch_size=16, eval_images=32, **QUIET
    ),
    *stage_settings("encode", shard_size=32, data__num_train=96),
    *stage_settings(
        "generator",
        generator__dim=64,  # the quickstart's fusion at the tiny preset's size
        generator__num_layers=2,
        trainer__max_steps=6,
        data__batch_size=8,
        data__num_workers=0,
        samples__every_n_steps=0,
        **QUIET,
    ),
    *stage_settings("samples", num_images=2),
    *stage_settings("variations", num_images=2),
    *stage_settings(
        "evaluate", max_images=32, generation__num_prompts=4, generation__num_sources=2
    ),
    *stage_settings("report", num_images=2),
]


def run_pipeline(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "pipeline.py"), f"run_dir={run_dir}"]
    return subprocess.run(
        [*command, *TINY, *overrides], capture_output=True, text=True, timeout=900, cwd=ROOT
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = run_pipeline(run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


@pytest.mark.slow
def test_every_stage_runs_and_reports_its_time_and_headline(finished_run):
    run_dir, result = finished_run
    summary = result.stdout.split("Pipeline finished in")[1]
    for number, stage in enumerate(STAGES, start=1):
        assert f"[{number}/{len(STAGES)}] {stage}" in summary
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert set(state) == set(STAGES)
    assert all(entry["seconds"] > 0 and entry["headline"] for entry in state.values())
    for output in (
        "tokenizer/model.safetensors",
        "clip/model.safetensors",
        "eval.json",
        "generator/model.safetensors",
        "samples/quickstart/grid.png",
        "variations/quickstart/grid.png",
        "report.html",
    ):
        assert (run_dir / output).is_file(), output
    assert str(run_dir / "report.html") in result.stdout
    assert "(beside tokenizer; its output goes to" in result.stdout  # both trained at once
    clip_log = run_dir / "logs" / "pipeline" / "clip.log"
    assert "CLIP written to" in clip_log.read_text()
    assert clip_log.with_name("clip.log.stderr").is_file()
    generator = json.loads((run_dir / "generator" / "config.json").read_text())
    assert generator["fusion"] == "early" and generator["num_condition_tokens"] > 0


@pytest.mark.slow
def test_the_report_has_every_section_with_its_images(finished_run):
    run_dir, _ = finished_run
    page = (run_dir / "report.html").read_text()
    for title in (
        "Evaluation",
        "Originals and reconstructions",
        "Text to image",
        "Variations",
        "Training curves",
        "All evaluation numbers",
    ):
        assert f"<h2>{title}</h2>" in page
    assert "No " not in page.split("<h2>Evaluation</h2>")[1]  # no section is missing
    assert page.count("data:image/png;base64,") >= 12 * 2 + 5 * 2 + 4 * 3
    assert page.count("<svg") >= 3
    assert page.count("match</span>") + page.count("matches</span>") >= 5 * 2  # verdicts
    assert "tokenizer.psnr" in page
    first_sample = (run_dir / "samples" / "quickstart" / "00-000.png").read_bytes()
    assert base64.b64encode(first_sample).decode() in page  # the samples stage's, not drawn again


@pytest.mark.slow
def test_a_second_run_reuses_every_finished_stage(finished_run):
    run_dir, _ = finished_run
    before = (run_dir / "generator" / "model.safetensors").stat().st_mtime_ns
    again = run_pipeline(run_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = again.stdout.split("Pipeline finished in")[1]
    assert summary.count("reused") == len(STAGES)
    assert (run_dir / "generator" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_changed_setting_reruns_that_stage_and_every_later_one_that_reads_the_run(finished_run):
    run_dir, _ = finished_run
    again = run_pipeline(run_dir, "++stages.samples.settings.seed=1")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = again.stdout.split("Pipeline finished in")[1]
    reused = [line.split()[1] for line in summary.splitlines() if " reused " in line]
    assert reused == ["tokenizer", "clip", "encode", "generator", "sources"]


def test_stage_settings_become_overrides_that_hydra_reads_back():
    sys.path.insert(0, str(ROOT / "scripts"))
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from pipeline import overrides

    settings = {
        "tokenizer": "shapes",
        "trainer": {"max_steps": 10, "lr": 0.5},
        "prompts": ["a red circle, small", 'say "hi" [now]', "plain"],
        "out": "/tmp/a b",
        "rerank": None,
        "flag": True,
    }
    strings = overrides(settings)
    assert strings[:3] == ["tokenizer=shapes", "trainer.max_steps=10", "trainer.lr=0.5"]
    parsed = OverridesParser.create().parse_overrides(strings)
    read_back = {override.key_or_group: override.value() for override in parsed}
    assert read_back == {
        "tokenizer": "shapes",
        "trainer.max_steps": 10,
        "trainer.lr": 0.5,
        "prompts": ["a red circle, small", 'say "hi" [now]', "plain"],
        "out": "/tmp/a b",
        "rerank": None,
        "flag": True,
    }


@pytest.mark.slow
def test_the_report_renders_in_a_browser(finished_run, tmp_path):
    run_dir, _ = finished_run
    screenshot = tmp_path / "report.png"
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 2400})
        page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
        images = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
        plots = page.evaluate(
            """[...document.querySelectorAll('svg')].map(svg => ({
                width: svg.getBoundingClientRect().width,
                points: svg.querySelector('polyline')?.points.numberOfItems ?? 0,
                length: svg.querySelector('polyline')?.getTotalLength() ?? 0,
            }))"""
        )
        page.screenshot(path=screenshot)
    assert len(images) >= 12 * 2 + 5 * 2 + 4 * 3
    assert all(width > 0 for width in images)  # every image loads
    assert all(plot["width"] > 0 and plot["points"] > 0 for plot in plots)  # every plot draws
    assert sum(plot["length"] > 0 for plot in plots) >= 3  # a curve for every training stage
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1100)
    colourful = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 60
    assert colourful.mean() > 0.01  # the embedded images show, not only text


def test_the_clip_headline_has_the_swap_probe(tmp_path):
    """Every swap train_clip probed, in percent; a swap no test image had (NaN) left out."""
    summary = {
        "clip_retrieval": {
            "seen": {"image_to_text_top1": 0.987},
            "held_out": {"image_to_text_top1": 0.578},
            "held_out_among_held_out": 0.97,
        },
        "clip_swap_probe": {
            "color": {"percent_right": 96.64, "num_images": 417},
            "shape": {"percent_right": 86.1, "num_images": 334},
            "size": {"percent_right": float("nan"), "num_images": 0},
            "relation": {"percent_right": 97.2, "num_images": 496},
        },
    }
    stdout = "training...\n" + json.dumps(summary)
    headline = load_script("pipeline.py").clip_headline(RunDir(tmp_path), stdout)
    assert headline == (
        "image->caption top-1 98.7% on seen, 57.8% on held-out combinations (97.0% among "
        "held-out captions only); swap probe color 96.6%, shape 86.1%, relation 97.2%"
    )
