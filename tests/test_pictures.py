"""A user's own pictures: OpenMoji as real data, the pictures experiment end to end, the report
and headlines about that data, whole-folder evaluation, loader workers that fit the machine."""

import html
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import ROOT, compose_config, load_script
from PIL import Image

from generator.held_out import held_out_images, held_out_prompts, split_batches
from generator.report_tables import headline_numbers, sections
from tokenizer.base.run_dir import RunDir
from tokenizer.data import DataConfig, FolderDataset
from tokenizer.data import config as data_config_module
from tokenizer.data.openmoji import Drawing, OpenMojiSelection

# ---------------------------------------------------------------------------------------------
# OpenMoji


def test_openmoji_arrives_as_a_captioned_folder_by_group(openmoji):
    groups = sorted(path.name for path in openmoji.iterdir() if path.is_dir())
    assert len(groups) == 12 and {"food-drink", "animals-nature", "flags"} <= set(groups)
    pictures = sorted(openmoji.rglob("*.png"))
    assert 120 <= len(pictures) <= 12 * 12
    assert all(Image.open(path).size == (64, 64) for path in pictures)
    assert "CC BY-SA 4.0" in (openmoji / "LICENSE-openmoji.txt").read_text()
    dataset = FolderDataset(DataConfig(source="folder", path=str(openmoji), image_size=32), "train")
    captions = [dataset[index].caption for index in range(len(dataset))]
    assert all(captions) and "grinning face" in captions
    image = dataset[0].image
    assert image.shape == (3, 32, 32) and image.min() < 0 < image.max()  # drawn, not blank


def test_a_selection_keeps_groups_drops_groups_and_names_unknown_ones():
    drawings = [Drawing(f"{group}{i}", group, "x") for group in "abc" for i in range(3)]
    assert {d.group for d in OpenMojiSelection(groups=["a", "c"]).apply(drawings)} == {"a", "c"}
    assert {d.group for d in OpenMojiSelection(exclude_groups=["a"]).apply(drawings)} == {"b", "c"}
    assert len(OpenMojiSelection(max_per_group=2).apply(drawings)) == 6
    variants = [
        Drawing("1F44B", "people", "waving hand"),
        Drawing("1F44B-1F3FB", "people", "x", True),
    ]
    assert OpenMojiSelection(skin_tones=False).apply(variants) == variants[:1]
    with pytest.raises(ValueError, match="OpenMoji has no group food: use some of"):
        OpenMojiSelection(groups=["food"]).apply(drawings)


# ---------------------------------------------------------------------------------------------
# Held-out prompts and pictures, whole folders


def folder_config(path: Path, **overrides) -> DataConfig:
    values = dict(source="folder", path=str(path), image_size=32, num_workers=0, batch_size=8)
    return DataConfig(**(values | overrides))


def test_held_out_prompts_and_pictures_come_from_the_folder_test_split(openmoji):
    config = folder_config(openmoji, test_fraction=0.1)
    test_files = FolderDataset(config, "test").files
    prompts = held_out_prompts(config, "test", 3)
    assert len(prompts) == 3 and len(set(prompts)) == 3
    captions = {(openmoji / f).with_suffix(".txt").read_text().strip() for f in test_files}
    assert set(prompts) <= captions
    assert held_out_images(config, "test", 4).shape == (4, 3, 32, 32)
    everything = sum(len(batch.image) for batch in split_batches(config, "all"))
    assert everything == len(list(openmoji.rglob("*.png")))


def test_sample_and_variations_scripts_take_held_out_captions_and_pictures(
    run_dir, tmp_path, openmoji, capsys
):
    data = ["data=folder", f"data.path={openmoji}", "data.num_workers=0", "data.test_fraction=0.1"]
    common = [f"run_dir={run_dir}", "num_images=2", "seed=0", "device=cpu", *data]
    config = compose_config("sample", [*common, "held_out_prompts=3", f"out={tmp_path / 's'}"])
    load_script("sample.py").sample(config)
    assert len(capsys.readouterr().out.split()) == 1 + 3 * 2  # the grid, 3 prompts x 2 images
    config = compose_config("variations", [*common, "held_out_images=2", f"out={tmp_path / 'v'}"])
    load_script("variations.py").make_variations(config)
    names = [Path(line).name for line in capsys.readouterr().out.split()]
    assert names == ["grid.png", *(f"0{row}-{n}.png" for row in (0, 1) for n in STEMS)]
    with pytest.raises(ValueError, match="held_out_prompts=N with data="):
        load_script("sample.py").sample(compose_config("sample", [f"run_dir={run_dir}"]))


STEMS = ("source", "000", "001")


def test_split_all_is_for_folders_and_shards():
    with pytest.raises(ValueError, match="split=all scores every image of a folder or shards"):
        split_batches(DataConfig(num_workers=0), "all")


def test_evaluate_scores_every_image_of_another_folder_beside_the_run(run_dir, tmp_path, openmoji):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    other = openmoji / "food-drink"
    overrides = [
        f"run_dir={run}",
        "data=folder",
        f"data.path={other}",
        "data.num_workers=0",
        "split=all",
        "with_generator=false",
    ]
    load_script("evaluate.py").evaluate(compose_config("evaluate", overrides))
    assert not (run / "eval.json").exists()  # the run's own evaluation is left alone
    results = json.loads((run / "eval_all_food-drink.json").read_text())
    assert results["split"] == "all" and "generator" not in results
    assert results["tokenizer"]["num_images"] == len(list(other.glob("*.png")))
    retrieval = results["clip_in_batch_retrieval"]
    assert retrieval["num_images"] == results["tokenizer"]["num_images"]
    assert 0 <= retrieval["image_to_text_top1"] <= retrieval["image_to_text_top5"] <= 1


# ---------------------------------------------------------------------------------------------
# The report and headlines say what was measured on this data


FOLDER_RESULTS = {
    "split": "test",
    "tokenizer": {
        "num_images": 45,
        "psnr": 25.31,
        "ssim": 0.91,
        "lpips": None,
        "usage": 0.8,
        "perplexity": 612.0,
        "num_codes_counted": 11520,
        "frechet_distance": 3.2,
        "checker_accuracy_originals": None,
        "checker_ratio": None,
        "checker_ratio_by_pair": None,
    },
    "clip_in_batch_retrieval": {"batch_size": 16, "image_to_text_top1": 0.4},
    "generator": {
        "with_cfg": {"cfg_scale": 1.5, "clip_score": 0.31, "frechet_distance": None},
        "without_cfg": {"cfg_scale": 1.0, "clip_score": 0.22, "frechet_distance": 9.5},
        "variations": {"consistency": None, "diversity": 0.2, "clip_similarity": 0.8},
    },
}


def test_the_report_tables_hold_every_number_of_a_folder_run():
    tables = sections(FOLDER_RESULTS)
    assert list(tables) == [
        "Tokenizer (45 test images)",
        "CLIP",
        "Text to image, with guidance (cfg_scale 1.5)",
        "Text to image, without guidance (cfg_scale 1)",
        "Variations",
    ]
    tokenizer = tables["Tokenizer (45 test images)"]
    assert tokenizer["PSNR"] == "25.31 dB" and tokenizer["codebook usage"] == "80.0%"
    assert tokenizer["LPIPS"].startswith("not measured: LPIPS's VGG weights")
    assert not any("checker" in label for label in tokenizer)  # shapes only
    guided = tables["Text to image, with guidance (cfg_scale 1.5)"]
    assert guided["CLIP score of samples (cosine to their prompts)"] == "0.31"
    assert any(value.startswith("not measured") for value in guided.values())
    assert "consistency (shape and colour kept)" not in tables["Variations"]
    everything = " ".join(v for table in tables.values() for v in table.values())
    assert "nan" not in everything and "n/a" not in everything
    headline = headline_numbers(FOLDER_RESULTS)
    assert headline["PSNR"] == "25.31 dB" and "CLIP similarity to the source" in headline


def test_the_report_tables_keep_the_shapes_checker_for_shapes():
    results = json.loads(json.dumps(FOLDER_RESULTS))
    results["tokenizer"] |= {"checker_ratio": 0.98, "checker_ratio_by_pair": {"seen": 0.99}}
    tokenizer = sections(results)["Tokenizer (45 test images)"]
    assert tokenizer["checker on reconstructions / originals"] == "98.0%"
    assert tokenizer["checker ratio, seen pairs"] == "99.0%"


def test_headlines_say_why_a_stage_has_no_validation_number(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from pipeline import generator_headline, tokenizer_headline

    run = RunDir(tmp_path)
    run.logs("tokenizer").mkdir(parents=True)
    (run.logs("tokenizer") / "metrics.csv").write_text("step,train/usage\n9,0.5\n")
    headline = tokenizer_headline(run, "")
    assert headline.startswith("val PSNR not measured: validation never ran")
    assert headline.endswith("codebook usage 50.0%")
    run.logs("generator").mkdir(parents=True)
    (run.logs("generator") / "metrics.csv").write_text("step,val/loss\n9,nan\n19,2.5\n29,nan\n")
    assert generator_headline(run, "") == "val loss 2.500"


@pytest.mark.parametrize("source", ["folder", "webdataset"])
def test_every_stage_of_the_pictures_experiment_composes_for_each_source(source):
    """Each stage's arguments, as the pipeline passes them, are overrides its script accepts:
    no shapes-only key reaches a folder or shards."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from pipeline import stage_arguments

    config = compose_config("pipeline", ["experiment=pictures", "images=/x", f"source={source}"])
    for name, stage in config.stages.items():
        script_config = compose_config(stage.script, stage_arguments(config, stage))
        if stage.get("data", False):
            assert script_config.data.source == source and script_config.data.path == "/x", name


def test_the_pictures_experiment_asks_for_the_pictures(tmp_path):
    config = compose_config("pipeline", ["experiment=pictures", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="This experiment needs images: add it to the command"):
        load_script("pipeline.py").run_pipeline(config)


# ---------------------------------------------------------------------------------------------
# Loader workers


def test_loader_workers_fit_the_cores(monkeypatch):
    monkeypatch.setattr(data_config_module, "usable_cores", lambda: 2)
    assert DataConfig().num_workers == 1  # one core left to the training process
    assert DataConfig(num_workers=0).num_workers == 0
    with pytest.warns(UserWarning, match="data.num_workers=4 is more than the 2 CPU cores"):
        assert DataConfig(num_workers=4).num_workers == 2
    monkeypatch.setattr(data_config_module, "usable_cores", lambda: 16)
    assert DataConfig().num_workers == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DataConfig(num_workers=8).num_workers == 8


# ---------------------------------------------------------------------------------------------
# The whole experiment on a real folder

TINY_PICTURES = [
    'common=["data=folder","data.path=PATH","data.val_fraction=0.1","data.test_fraction=0.1",'
    '"data.num_workers=0"]',
    "sampling.rerank=2",
    "++stages.tokenizer.settings.trainer.max_steps=6",
    "++stages.tokenizer.settings.trainer.limit_val_batches=1",
    "++stages.tokenizer.settings.trainer.val_check_interval=3",
    "++stages.tokenizer.settings.data.batch_size=8",
    "++stages.clip.settings.trainer.max_steps=6",
    "++stages.clip.settings.trainer.val_check_interval=3",
    "++stages.clip.settings.data.batch_size=16",
    "++stages.generator.settings.generator=tiny",
    "++stages.generator.settings.trainer.max_steps=6",
    "++stages.generator.settings.trainer.val_check_interval=3",
    "++stages.generator.settings.data.batch_size=8",
    "++stages.generator.settings.data.num_workers=0",
    "++stages.generator.settings.samples.every_n_steps=0",
    "++stages.samples.settings.num_images=2",
    "++stages.variations.settings.num_images=2",
    "++stages.evaluate.settings.generation.num_prompts=4",
    "++stages.evaluate.settings.generation.num_sources=2",
    "++stages.report.settings.num_images=2",
]


@pytest.mark.slow
def test_the_pictures_experiment_runs_on_a_real_folder_and_reports_on_it(openmoji, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [item.replace("PATH", str(openmoji)) for item in TINY_PICTURES]
    command = [sys.executable, str(ROOT / "scripts" / "pipeline.py"), "experiment=pictures"]
    command += [f"images={openmoji}", f"run_dir={run_dir}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("Pipeline finished in")[1]
    assert "nan" not in summary and "n/a" not in summary
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert list(state) == [
        *("tokenizer", "clip", "encode", "generator", "samples", "variations"),
        *("evaluate", "report"),
    ]
    assert "val PSNR" in state["tokenizer"]["headline"] and "dB" in state["tokenizer"]["headline"]
    assert "PSNR" in state["evaluate"]["headline"]
    config = folder_config(openmoji, val_fraction=0.1, test_fraction=0.1)
    captions = held_out_prompts(config, "test", 5)
    grid = run_dir / "samples" / "held_out" / "grid.png"
    assert grid.is_file() and len(list(grid.parent.glob("*.png"))) == 1 + 2 * len(captions)
    varied = run_dir / "variations" / "held_out"
    assert len(list(varied.glob("*source.png"))) == 3
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["tokenizer"]["psnr"] > 0 and "clip_in_batch_retrieval" in results
    assert results["generator"]["variations"]["clip_similarity"] is not None
    page = (run_dir / "report.html").read_text()
    assert all(f"<h3>{html.escape(caption)}</h3>" in page for caption in captions)
    assert "match</span>" not in page  # the shapes checker only judges shapes
    assert "<h3>Tokenizer (" in page and "<h3>Variations</h3>" in page
