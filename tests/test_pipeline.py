"""The pipeline over a whole run directory: loading, text to image, variations, the scripts."""

import base64
import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    compose_config,
    decompression_bomb_png,
    huge_header_png,
    load_script,
    run_script,
    save_clip,
    save_random_generator,
    save_tokenizer,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

import generator.pipeline
from generator.clip import CLIPConfig, load_clip
from generator.evaluation import (
    GenerationEvalConfig,
    attribute_right,
    evaluate_generator,
    evaluate_variations,
    mean_pairwise_l1,
    relation_right,
    shapes_prompts,
    shapes_sources,
)
from generator.export import Provenance, RunMismatchError, load_generator
from generator.images import read_prompted_images, to_uint8
from generator.pipeline import (
    DEFAULT_OPTIONS,
    Generated,
    Pipeline,
    Variations,
    clean_prompt,
    resolve_device,
)
from generator.shards import tokenizer_fingerprint
from tokenizer import shapes
from tokenizer.data import DataConfig, build_dataset
from tokenizer.shapes import Scene, ShapeObject, parse_caption

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle in the center", "a large blue square on the left"]


@pytest.fixture(scope="module")
def pipeline(run_dir) -> Pipeline:
    return Pipeline.from_run_dir(run_dir)


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A private copy of the shared run, for scripts that write into their run directory."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    return run


def shapes_images(count: int) -> torch.Tensor:
    dataset = build_dataset(DataConfig(num_test=count, image_size=32), "test")
    return torch.stack([dataset[i].image for i in range(count)])  # (B, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# Loading


def test_a_run_loads_with_its_own_parts(pipeline):
    assert pipeline.model.config.vocab_size == pipeline.vqgan.num_codes == 64
    assert pipeline.provenance.clip_fingerprint == pipeline.clip.fingerprint()


@pytest.mark.parametrize("wrong", ["tokenizer", "clip"])
def test_a_generator_of_another_tokenizer_or_clip_is_refused(run_dir, tmp_path, wrong):
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    (save_tokenizer if wrong == "tokenizer" else save_clip)(other, seed=1)
    message = "another tokenizer" if wrong == "tokenizer" else "another CLIP"
    with pytest.raises(RunMismatchError, match=message):
        Pipeline.from_run_dir(other)


@pytest.mark.parametrize("field", ["tokenizer_fingerprint", "clip_fingerprint"])
def test_a_provenance_that_names_other_parts_is_refused(run_dir, tmp_path, field):
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    clip = load_clip(CLIPConfig(source="trained"), other)
    values = {
        "tokenizer_fingerprint": tokenizer_fingerprint(other / "tokenizer"),
        "clip_fingerprint": clip.fingerprint(),
        "condition": "text",
    }
    save_random_generator(other, Provenance(**{**values, field: "0" * 64}))
    with pytest.raises(RunMismatchError):
        Pipeline.from_run_dir(other)


def test_missing_parts_say_what_to_run(run_dir, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(run_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(FileNotFoundError, match="scripts/train_tokenizer.py"):
        Pipeline.from_run_dir(no_tokenizer)
    no_generator = tmp_path / "no_generator"
    shutil.copytree(run_dir, no_generator, ignore=shutil.ignore_patterns("generator"))
    with pytest.raises(FileNotFoundError, match="scripts/train_generator.py"):
        Pipeline.from_run_dir(no_generator)
    no_clip = tmp_path / "no_clip"
    shutil.copytree(run_dir, no_clip, ignore=shutil.ignore_patterns("clip"))
    with pytest.raises(FileNotFoundError, match="clip="):
        Pipeline.from_run_dir(no_clip)


def test_a_generator_whose_provenance_names_its_clip_needs_no_clip_argument(run_copy, tmp_path):
    """A run that encoded with a CLIP from elsewhere (pretrained, a file) has no RUN/clip: the
    CLIP config encode.py used travels into RUN/generator/provenance.json."""
    elsewhere = tmp_path / "elsewhere" / "clip"
    shutil.copytree(run_copy / "clip", elsewhere)
    fingerprint = load_clip(CLIPConfig(source="trained"), run_copy).fingerprint()
    provenance = Provenance(
        tokenizer_fingerprint(run_copy / "tokenizer"),
        fingerprint,
        "text",
        clip=CLIPConfig(source="trained", checkpoint=str(elsewhere)),
    )
    save_random_generator(run_copy, provenance)
    shutil.rmtree(run_copy / "clip")
    pipeline = Pipeline.from_run_dir(run_copy)
    assert pipeline.clip.fingerprint() == fingerprint
    assert load_generator(run_copy / "generator").provenance == provenance


# ---------------------------------------------------------------------------------------------
# Text to image


def test_text_to_image_returns_the_requested_images(pipeline):
    out = pipeline.text_to_image(PROMPTS, 3, replace(DEFAULT_OPTIONS, seed=0))
    assert out.images.shape == (6, 3, 32, 32) and out.images.dtype == torch.float32
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.codes.shape == (6, 8, 8) and out.codes.dtype == torch.long
    assert out.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    expected = pipeline.vqgan.decode(out.codes)
    assert torch.allclose(out.images, (expected + 1) / 2, atol=1e-5)


def test_the_same_seed_gives_the_same_images(pipeline):
    first = pipeline.text_to_image(PROMPTS, 2, replace(DEFAULT_OPTIONS, seed=3, top_k=20))
    again = pipeline.text_to_image(PROMPTS, 2, replace(DEFAULT_OPTIONS, seed=3, top_k=20))
    other = pipeline.text_to_image(PROMPTS, 2, replace(DEFAULT_OPTIONS, seed=4, top_k=20))
    assert torch.equal(first.codes, again.codes) and torch.equal(first.images, again.images)
    assert not torch.equal(first.codes, other.codes)
    pipeline.batch_size = 3  # sampled in chunks, one generator throughout
    try:
        chunked = [
            pipeline.text_to_image(PROMPTS, 2, replace(DEFAULT_OPTIONS, seed=3, top_k=20))
            for _ in range(2)
        ]
    finally:
        pipeline.batch_size = 256
    assert torch.equal(chunked[0].codes, chunked[1].codes)


def test_rerank_keeps_the_candidate_clip_ranks_best(pipeline):
    reranked = pipeline.text_to_image(PROMPTS[:1], 2, replace(DEFAULT_OPTIONS, seed=0, rerank=4))
    candidates = pipeline.text_to_image(PROMPTS[:1], 8, replace(DEFAULT_OPTIONS, seed=0))
    images = candidates.images * 2 - 1
    similarity = pipeline.clip.encode_image(images) @ pipeline.clip.encode_text(PROMPTS[:1]).T
    best = similarity.view(2, 4).argmax(dim=1) + torch.tensor([0, 4])
    assert torch.equal(reranked.codes, candidates.codes[best])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"cfg_scale": -1}, "cfg_scale"),
        ({"num_images": 0}, "num_images"),
        ({"rerank": -1}, "rerank"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_parameters_raise_before_any_work(pipeline, monkeypatch, options, message):
    def no_work(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(generator.pipeline, "generate", no_work)
    monkeypatch.setattr(pipeline.clip, "encode_text", no_work)
    monkeypatch.setattr(pipeline.clip, "encode_image", no_work)
    options = dict(options)
    num_images = options.pop("num_images", 1)
    options = replace(DEFAULT_OPTIONS, **options)
    with pytest.raises(ValueError, match=message):
        pipeline.text_to_image(PROMPTS, num_images, options)
    with pytest.raises(ValueError, match=message):
        pipeline.variations(shapes_images(1), num_images, options)


@pytest.mark.parametrize("prompts", [[""], ["   "], ["a red circle", "\x00\x07\t"], []])
def test_empty_prompts_raise_before_any_work(pipeline, monkeypatch, prompts):
    monkeypatch.setattr(generator.pipeline, "generate", None)  # any call would fail differently
    with pytest.raises(ValueError, match="empty|No prompts"):
        pipeline.text_to_image(prompts)


def test_prompts_are_cleaned_and_cut_to_clip_context(pipeline):
    assert clean_prompt("a red\x00 circle\u200b\n") == "a red circle"
    assert clean_prompt(b"a \xff red circle") == "a red circle"
    assert clean_prompt("a \udcff red circle") == "a red circle"  # an undecodable argv byte
    with pytest.warns(UserWarning, match="control characters"):
        out = pipeline.text_to_image(["a red\x07 circle"], 1, replace(DEFAULT_OPTIONS, seed=0))
    assert out.prompts == ["a red circle"]
    long = " ".join(["a small red circle"] * 10)
    with pytest.warns(UserWarning, match="CLIP tokens .* cut to"):
        out = pipeline.text_to_image([long], 1, replace(DEFAULT_OPTIONS, seed=0))
    (kept,) = out.prompts
    assert long.startswith(kept) and len(kept.split()) == 22  # 24 tokens less start and end


# ---------------------------------------------------------------------------------------------
# Variations


@pytest.mark.parametrize("keep_rows", [0, 3, 8])
def test_keep_rows_keeps_exactly_the_source_top_rows(pipeline, keep_rows):
    sources = shapes_images(2)
    out = pipeline.variations(sources, 3, replace(DEFAULT_OPTIONS, seed=0), keep_rows=keep_rows)
    assert out.images.shape == (6, 3, 32, 32) and out.codes.shape == (6, 8, 8)
    assert out.source_index.tolist() == [0, 0, 0, 1, 1, 1]
    source_codes = pipeline.vqgan.encode(sources)[out.source_index]  # (6, 8, 8)
    kept = out.codes[:, :keep_rows] == source_codes[:, :keep_rows]
    assert kept.all()
    if keep_rows < 8:  # the random generator does not redraw the source below the kept rows
        assert not (out.codes[:, keep_rows] == source_codes[:, keep_rows]).all()
    assert torch.allclose(out.sources, (sources + 1) / 2)


def test_keep_rows_outside_the_grid_is_refused(pipeline):
    for keep_rows in (-1, 9):
        with pytest.raises(ValueError, match="keep_rows must be from 0 to"):
            pipeline.variations(shapes_images(1), keep_rows=keep_rows)


def test_image_files_are_read_resized_or_refused(pipeline, tmp_path):
    path = tmp_path / "source.png"
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(path)
    with pytest.warns(UserWarning, match="48x40 px .* 32x32"):
        out = pipeline.variations(path, 2, replace(DEFAULT_OPTIONS, seed=0))
    assert out.sources.shape == (1, 3, 32, 32)
    assert torch.allclose(out.sources, torch.full_like(out.sources, 200 / 255), atol=1e-5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="Cannot read .*broken.png as an image"):
        pipeline.variations(broken)
    with pytest.raises(FileNotFoundError, match="No image file"):
        pipeline.variations(tmp_path / "missing.png")


def test_image_files_over_the_pixel_limit_are_refused_unread(pipeline, tmp_path):
    for name, data in (("huge.png", huge_header_png()), ("bomb.png", decompression_bomb_png())):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"Cannot read .*{name} as an image"):
            pipeline.variations(path)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.full((1, 3, 32, 32), float("nan")), "NaN or infinite"),
        (torch.zeros(1, 1, 32, 32), "expected float images of shape"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "expected float images of shape"),
        (torch.zeros(0, 3, 32, 32), "No source images"),
    ],
)
def test_source_tensors_that_are_not_images_are_refused(pipeline, images, message):
    with pytest.raises(ValueError, match=message):
        pipeline.variations(images)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers


def test_attribute_accuracy_pairs_objects_either_way():
    query = parse_caption("a small red circle to the left of a large blue square")
    scene = Scene(
        (
            ShapeObject("square", "blue", "large", "right"),
            ShapeObject("circle", "red", "large", "left"),
        ),
        "white",
    )
    assert attribute_right(scene, query, "shape") and attribute_right(scene, query, "color")
    assert not attribute_right(scene, query, "size")
    assert not attribute_right(Scene(scene.objects[:1], "white"), query, "shape")
    assert relation_right(scene, query)  # the red circle is left of the blue square
    swapped = Scene(
        (
            dataclasses.replace(scene.objects[0], position="left"),
            dataclasses.replace(scene.objects[1], position="right"),
        ),
        "white",
    )
    assert not relation_right(swapped, query)
    assert not relation_right(scene, parse_caption("a small red circle in the center"))


class OraclePipeline:
    """Draws exactly what it is asked for: the real image of each prompt, and copies of each
    source as its variations. The checker must then find every sample right."""

    def __init__(self, clip, images: dict[str, torch.Tensor]) -> None:
        self.clip, self.images = clip, images

    def text_to_image(self, prompts, num_images, options=None) -> Generated:
        images = torch.stack([self.images[p] for p in prompts]).repeat_interleave(num_images, 0)
        repeated = [prompt for prompt in prompts for _ in range(num_images)]
        return Generated((images + 1) / 2, torch.zeros(len(repeated), 8, 8), repeated)

    def variations(self, sources, num_images, options=None, keep_rows=0) -> Variations:
        index = torch.arange(sources.shape[0]).repeat_interleave(num_images)
        images = (sources[index] + 1) / 2
        return Variations(images, torch.zeros(len(index), 8, 8), (sources + 1) / 2, index)


def test_evaluation_scores_right_images_as_right(pipeline):
    dataset = build_dataset(DataConfig(num_test=150, image_size=32), "test")
    prompts = shapes_prompts(dataset, num_prompts=5)
    assert [prompts.groups.count(g) for g in ("seen", "held_out", "two_object")] == [5, 5, 5]
    oracle = OraclePipeline(pipeline.clip, dict(zip(prompts.prompts, prompts.images, strict=True)))
    config = GenerationEvalConfig(images_per_prompt=2, variations_per_source=2)
    metrics = evaluate_generator(oracle, prompts, shapes_sources(dataset, 3), config, True)
    for results in (metrics.with_cfg, metrics.without_cfg):
        for accuracy in results.caption_accuracy.values():
            assert accuracy.num_prompts == 5 and accuracy.num_images == 10
            assert accuracy.accuracy == accuracy.shape == accuracy.position == 1.0
    assert metrics.variations.consistency == 1.0 and metrics.variations.diversity == 0.0
    assert metrics.variations.clip_similarity == pytest.approx(1.0, abs=1e-5)
    no_unguided = replace(config, unguided=False, num_sources=0)
    metrics = evaluate_generator(oracle, prompts, shapes_sources(dataset, 0), no_unguided, True)
    assert metrics.without_cfg is None and metrics.with_cfg.cfg_scale == 3.0
    only_run = replace(no_unguided, cfg_scale=1.0)  # guidance off: the one run is the unguided one
    metrics = evaluate_generator(oracle, prompts, shapes_sources(dataset, 0), only_run, True)
    assert metrics.with_cfg is None and metrics.without_cfg.cfg_scale == 1.0


def drawn(obj: ShapeObject) -> torch.Tensor:
    """(3, 32, 32) in [-1, 1]: one object on white."""
    image = shapes.draw(Scene((obj,), "white"), 32)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


class ShapeSwappingPipeline(OraclePipeline):
    """Copies each source, except that a held-out pair comes back as a square of its colour."""

    def variations(self, sources, num_images, options=None, keep_rows=0) -> Variations:
        varied = super().variations(sources, num_images, options, keep_rows)
        images = varied.images.clone()
        for i, scene in enumerate(shapes.check_batch(varied.images * 2 - 1)):
            if shapes.is_held_out(scene):
                square = dataclasses.replace(scene.objects[0], shape="square")
                images[i] = (drawn(square) + 1) / 2
        return varied._replace(images=images)


def test_variation_consistency_is_split_by_the_source_pair(pipeline):
    seen = ShapeObject("circle", "red", "large", "center")
    held_out = ShapeObject("triangle", "green", "large", "center")
    assert shapes.is_held_out(Scene((held_out,), "white"))
    sources = torch.stack([drawn(seen), drawn(held_out), drawn(seen)])
    config = GenerationEvalConfig(variations_per_source=2)
    scores = evaluate_variations(ShapeSwappingPipeline(pipeline.clip, {}), sources, config, True)
    assert scores.consistency_by_source == {"seen": 1.0, "held_out": 0.0}
    assert scores.consistency == pytest.approx(4 / 6)


def test_variations_take_their_own_number_of_candidates_where_set(pipeline):
    sources = torch.stack([drawn(ShapeObject("circle", "red", "large", "center"))])
    drawn_with = []

    class Recording(OraclePipeline):
        def variations(self, sources, num_images, options=None, keep_rows=0) -> Variations:
            drawn_with.append(options.rerank)
            return super().variations(sources, num_images, options, keep_rows)

    recording = Recording(pipeline.clip, {})
    config = GenerationEvalConfig(variations_per_source=2, rerank=48)
    evaluate_variations(recording, sources, config, True)
    evaluate_variations(recording, sources, replace(config, variation_rerank=24), True)
    evaluate_variations(recording, sources, replace(config, variation_rerank=0), True)
    assert drawn_with == [48, 24, 0]
    with pytest.raises(ValueError, match="generation.variation_rerank must be at least 0"):
        replace(config, variation_rerank=-1)


def test_diversity_is_zero_for_copies_and_the_mean_l1_otherwise():
    copies = torch.zeros(4, 3, 2, 2)
    assert mean_pairwise_l1(copies, per_group=2) == 0
    pair = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    assert mean_pairwise_l1(torch.cat([pair, copies[:2]]), per_group=2) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# Scripts


@pytest.mark.parametrize("name", ["sample", "variations", "evaluate"])
def test_sampling_configs_use_the_run_clip_unless_told_otherwise(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        plain = compose(config_name=name, overrides=["run_dir=RUN"])
        named = compose(config_name=name, overrides=["run_dir=RUN", "clip=openai_vit_b32"])
    assert plain.get("clip") is None
    assert instantiate(named.clip, _convert_="all").source == "pretrained"
    if name == "evaluate":
        assert isinstance(instantiate(plain.generation, _convert_="all"), GenerationEvalConfig)


def test_sample_script_writes_a_grid_and_singles(run_dir, tmp_path):
    out = tmp_path / "samples"
    result = run_script(
        "sample.py",
        f"run_dir={run_dir}",
        "prompt=a red circle",
        "num_images=3",
        "seed=0",
        "device=cpu",
        "precision=fp32",  # compared with an fp32 pipeline below, on any CPU
        f"out={out}",
        check=True,
    )
    paths = [Path(line) for line in result.stdout.strip().splitlines()]
    assert [p.name for p in paths] == ["grid.png", "000.png", "001.png", "002.png"]
    assert all(p.parent == out and p.is_file() for p in paths)
    assert Image.open(paths[1]).size == (32, 32)
    expected = Pipeline.from_run_dir(run_dir).text_to_image(
        ["a red circle"], 3, replace(DEFAULT_OPTIONS, seed=0)
    )
    first = torch.from_numpy(np.array(Image.open(paths[1]))).permute(2, 0, 1) / 255
    assert torch.allclose(first, expected.images[0], atol=1 / 255 + 1e-6)


def test_sample_script_takes_any_bytes_as_a_prompt(run_dir, tmp_path):
    """Letters beyond ASCII, control characters and invalid UTF-8 on the command line reach the
    pipeline's cleaning, rather than stopping Hydra's override parser."""
    result = run_script(
        "sample.py",
        f"run_dir={run_dir}",
        b"prompt=a caf\xc3\xa9 \xff red\x07 circle",
        "num_images=1",
        "seed=0",
        "device=cpu",
        f"out={tmp_path / 'samples'}",
        check=True,
    )
    assert "using 'a caf\u00e9 red circle'" in result.stderr
    assert Path(result.stdout.splitlines()[0]) == tmp_path / "samples" / "grid.png"


def test_sample_script_defaults_to_a_folder_in_the_run(run_copy, capsys):
    overrides = ["prompts=[a red circle,a blue square]", "num_images=2", "seed=1", "device=cpu"]
    load_script("sample.py").sample(compose_config("sample", [f"run_dir={run_copy}", *overrides]))
    paths = [Path(line) for line in capsys.readouterr().out.strip().splitlines()]
    folder = run_copy / "samples" / "a-red-circle-and-1-more" / "seed1"
    assert paths[0] == folder / "grid.png" and len(paths) == 5 and all(p.is_file() for p in paths)
    assert paths[-1].name == "01-001.png"


def test_the_report_shows_the_samples_a_folder_holds_without_sampling_them(run_copy, monkeypatch):
    overrides = ["prompts=[a red circle,a blue square]", "num_images=2", "seed=1", "device=cpu"]
    load_script("sample.py").sample(compose_config("sample", [f"run_dir={run_copy}", *overrides]))
    folder = run_copy / "samples" / "a-red-circle-and-1-more" / "seed1"
    samples = read_prompted_images(folder)
    assert samples.prompts == ["a red circle", "a blue square"] and samples.per_prompt == 2
    second = np.asarray(Image.open(folder / "01-000.png"))
    assert np.array_equal(second, to_uint8(samples.images[2]))

    def no_sampling(*args, **kwargs):
        raise AssertionError("the report sampled the prompts again")

    monkeypatch.setattr(Pipeline, "text_to_image", no_sampling)
    config = compose_config("report", [f"run_dir={run_copy}", f"samples_from={folder}"])
    load_script("report.py").report(config)
    page = (run_copy / "report.html").read_text()
    assert "<h3>a red circle</h3>" in page and "<h3>a blue square</h3>" in page
    for name in ("00-000", "00-001", "01-000", "01-001"):  # the very PNGs, embedded
        assert base64.b64encode((folder / f"{name}.png").read_bytes()).decode() in page
    (folder / "01-001.png").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 01-001.png of its samples"):
        read_prompted_images(folder)
    with pytest.raises(FileNotFoundError, match="has no prompts.json"):
        read_prompted_images(run_copy)


def test_variations_script_writes_the_source_beside_its_variations(run_copy, tmp_path):
    image = tmp_path / "my image.png"
    Image.fromarray(build_dataset(DataConfig(num_test=1), "test").example(0).image).save(image)
    result = run_script(
        "variations.py",
        f"run_dir={run_copy}",
        f"image={image}",
        "num_images=2",
        "seed=0",
        "keep_rows=2",
        "device=cpu",
        check=True,
    )
    paths = [Path(line) for line in result.stdout.strip().splitlines()]
    folder = run_copy / "variations" / "my-image" / "seed0"
    assert paths == [folder / name for name in ("grid.png", "source.png", "000.png", "001.png")]
    assert Image.open(paths[0]).size == (3 * 34 + 2, 36)  # source + 2 variations, 2 px padding


def test_evaluate_reports_the_generator(run_copy, capsys):
    overrides = [
        f"run_dir={run_copy}",
        "max_images=8",
        "data.num_test=60",
        "data.batch_size=8",
        "data.num_workers=0",
        "generation.num_prompts=2",
        "generation.num_sources=2",
        "generation.variations_per_source=2",
        "generation.temperature=0.9",
    ]
    load_script("evaluate.py").evaluate(compose_config("evaluate", overrides))
    stdout = capsys.readouterr().out
    report = json.loads(stdout[stdout.index("{") :])
    assert report == json.loads((run_copy / "eval.json").read_text())
    assert {"tokenizer", "generator"} <= set(report)
    generated = report["generator"]
    assert generated["settings"]["num_prompts"] == 2 and generated["settings"]["temperature"] == 0.9
    for run_name, scale in (("with_cfg", 3.0), ("without_cfg", 1.0)):
        results = generated[run_name]
        assert results["cfg_scale"] == scale and -1 <= results["clip_score"] <= 1
        accuracy = results["caption_accuracy"]
        assert set(accuracy) == {"seen", "held_out", "two_object"}
        assert accuracy["seen"]["num_prompts"] == 2 and accuracy["seen"]["num_images"] == 2
        assert set(accuracy["seen"]) >= {"accuracy", "shape", "color", "size", "position"}
    variations = generated["variations"]
    assert variations["num_sources"] == 2 and 0 <= variations["consistency"] <= 1
    assert variations["diversity"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is")
def test_a_device_that_is_not_here_is_refused_at_start():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device=cuda but torch sees no GPU here: use device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device='gpu0' is not a device: use cpu, cuda or auto"):
        resolve_device("gpu0")
