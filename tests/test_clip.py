"""CLIP through open_clip: three sources, one interface; batches, training and export."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_SMALL, random_images, save_small_clip
from omegaconf import OmegaConf
from safetensors.torch import save_file

from generator.clip import (
    CLIPConfig,
    CLIPEncoder,
    ImagePreprocess,
    MissingCLIPWeightsError,
    build_small_clip,
    clip_tokenizer,
    load_clip,
    save_trained_clip,
)
from generator.clip.data import CaptionDataModule, CaptionedImage, DistinctCaptions
from generator.clip.trained import CachedTokenizer
from tokenizer.data import DataConfig, build_dataset
from tokenizer.shapes import Scene, ShapeObject, canonical_caption

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = "test-tiny-clip"  # an open_clip architecture registered by the fixture below
CAPTIONS = ["a small red circle in the center on a white background", "a blue square", "x"]


class Unsafe:
    """Any object but tensors and containers: a weights-only unpickler must refuse it."""


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """Register a tiny open_clip architecture, as a user's model config would be."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 16,
            "head_width": 8,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 16,
            "heads": 2,
            "layers": 1,
        },
    }
    path = tmp_path_factory.mktemp("open_clip_config") / f"{TINY_ARCH}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_ARCH


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_arch, tmp_path_factory) -> Path:
    """A checkpoint file of the tiny architecture with random weights, as safetensors."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch)
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(path))
    return path


def register_tag(monkeypatch, arch: str, tag: str, tag_config: dict) -> None:
    """Add a pretrained tag to open_clip's zoo for this test (open_clip has no public API)."""
    zoo = open_clip.pretrained._PRETRAINED
    monkeypatch.setitem(zoo, arch, {**zoo.get(arch, {}), tag: tag_config})


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("run") / "clip"
    save_small_clip(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# Three sources, one interface


def test_the_training_tokenizer_gives_open_clips_tokens_and_keeps_a_bounded_number():
    tokenizer = open_clip.SimpleTokenizer(context_length=12)
    cached = CachedTokenizer(tokenizer, size=2)
    captions = ["a red circle", "a blue square", "a red circle", "a small green triangle on top"]
    assert torch.equal(cached(captions), tokenizer(captions))
    assert list(cached.tokens) == ["a red circle", "a blue square"]  # the first two only
    assert torch.equal(cached(captions[::-1]), tokenizer(captions[::-1]))


def test_file_source_loads_the_checkpoint_weights(tiny_arch, tiny_checkpoint):
    encoder = load_clip(
        CLIPConfig(source="file", model_name=tiny_arch, checkpoint=str(tiny_checkpoint))
    )
    reference = open_clip.create_model(tiny_arch, pretrained=str(tiny_checkpoint)).eval()
    batch = random_images(4)
    pixels = (batch + 1) / 2
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.encode_image((pixels - mean) / std, normalize=True)
    assert encoder.embed_dim == 16
    assert torch.allclose(encoder.encode_image(batch), expected, atol=1e-6)


def test_file_source_reads_plain_state_dict_pickles_but_refuses_objects(
    tiny_arch, tiny_checkpoint, tmp_path
):
    state = open_clip.create_model(tiny_arch, pretrained=str(tiny_checkpoint)).state_dict()
    plain = tmp_path / "tiny.pt"
    torch.save(state, plain)
    from_pickle = load_clip(CLIPConfig(source="file", model_name=tiny_arch, checkpoint=str(plain)))
    from_safetensors = load_clip(
        CLIPConfig(source="file", model_name=tiny_arch, checkpoint=str(tiny_checkpoint))
    )
    assert from_pickle.fingerprint() == from_safetensors.fingerprint()

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": state, "extra": Unsafe()}, unsafe)
    with pytest.raises(ValueError, match="clip.model_name.*pickled objects"):
        load_clip(CLIPConfig(source="file", model_name=tiny_arch, checkpoint=str(unsafe)))


def test_pretrained_source_goes_through_the_zoo(tiny_arch, tiny_checkpoint, monkeypatch):
    """A zoo tag whose weights are already on disk: the same weights as source=file."""
    register_tag(monkeypatch, tiny_arch, "local", {"file": str(tiny_checkpoint)})
    pretrained = load_clip(
        CLIPConfig(source="pretrained", model_name=tiny_arch, pretrained="local")
    )
    file = load_clip(
        CLIPConfig(source="file", model_name=tiny_arch, checkpoint=str(tiny_checkpoint))
    )
    assert pretrained.fingerprint() == file.fingerprint()
    assert torch.equal(pretrained.encode_text(CAPTIONS), file.encode_text(CAPTIONS))


def test_pretrained_without_network_says_how_to_place_the_file(tiny_arch, monkeypatch, tmp_path):
    url = "http://127.0.0.1:9/tiny-weights.pt"  # nothing listens on the discard port
    register_tag(monkeypatch, tiny_arch, "offline", {"url": url, "hf_hub": "", "quick_gelu": True})
    config = CLIPConfig(
        source="pretrained", model_name=tiny_arch, pretrained="offline", cache_dir=str(tmp_path)
    )
    with pytest.raises(MissingCLIPWeightsError) as error:
        load_clip(config)
    message = str(error.value)
    assert url in message
    assert f"clip.source=file clip.model_name={tiny_arch} clip.quick_gelu=true" in message
    assert "clip.checkpoint=" in message


def test_trained_source_reloads_identically(trained_dir):
    config = CLIPConfig(source="trained", **TINY_SMALL)
    torch.manual_seed(0)
    model = build_small_clip(config)  # the weights the fixture saved
    direct = CLIPEncoder(model, clip_tokenizer(config), ImagePreprocess.of(model), config, 16)
    from_run = load_clip(CLIPConfig(source="trained"), run_dir=trained_dir.parent)
    from_path = load_clip(CLIPConfig(source="trained", checkpoint=str(trained_dir)))
    batch = random_images(5)
    assert torch.equal(from_run.encode_image(batch), direct.encode_image(batch))
    assert torch.equal(from_run.encode_text(CAPTIONS), direct.encode_text(CAPTIONS))
    assert from_run.fingerprint() == from_path.fingerprint() == direct.fingerprint()
    assert from_run.embed_dim == 16 and from_run.config.vision_width == 16


def test_a_convolutional_stem_lets_a_patch_see_past_its_border(tmp_path):
    """The plain patch embedding reads its 8 x 8 pixels only; a stem's token also reads the
    pixels just before its patch, and a CLIP with a stem saves and reloads like any other."""
    image = random_images(1)
    neighbour = image.clone()
    neighbour[:, :, 3, 7] = -neighbour[:, :, 3, 7]  # the last column of the first patch
    for stem, sees_it in ((0, False), (8, True)):
        config = save_small_clip(tmp_path / str(stem), conv_stem=stem)
        torch.manual_seed(0)
        model = build_small_clip(config).eval()  # the weights just saved
        with torch.no_grad():
            second_patch = [model.visual.conv1(x)[:, :, 0, 1] for x in (image, neighbour)]
        assert second_patch[0].shape == (1, config.vision_width)
        assert (not torch.equal(*second_patch)) == sees_it
        loaded = load_clip(CLIPConfig(source="trained", checkpoint=str(tmp_path / str(stem))))
        assert loaded.config.conv_stem == stem
        direct = CLIPEncoder(model, clip_tokenizer(config), ImagePreprocess.of(model), config, 16)
        assert torch.equal(loaded.encode_image(image), direct.encode_image(image))


def test_a_clip_saved_without_the_stem_setting_loads_without_a_stem(trained_dir, tmp_path):
    before = load_clip(CLIPConfig(source="trained", checkpoint=str(trained_dir)))
    old = tmp_path / "clip"
    old.mkdir()
    for name in ("model.safetensors", "config.json"):
        (old / name).write_bytes((trained_dir / name).read_bytes())
    config = json.loads((old / "config.json").read_text())
    del config["conv_stem"]  # a CLIP folder written before the stem existed
    (old / "config.json").write_text(json.dumps(config))
    after = load_clip(CLIPConfig(source="trained", checkpoint=str(old)))
    assert after.config.conv_stem == 0
    images = random_images(2)
    assert torch.equal(after.encode_image(images), before.encode_image(images))


def test_fingerprint_changes_with_the_weights(trained_dir):
    encoder = load_clip(CLIPConfig(source="trained", checkpoint=str(trained_dir)))
    before = encoder.fingerprint()
    torch.manual_seed(1)
    other = build_small_clip(encoder.config)
    changed = CLIPEncoder(other, encoder.tokenize, encoder.preprocess, encoder.config, 16)
    assert len(before) == 64 and changed.fingerprint() != before


# ---------------------------------------------------------------------------------------------
# Embeddings


def test_embeddings_are_unit_vectors_and_do_not_depend_on_the_batching(trained_dir):
    encoder = load_clip(CLIPConfig(source="trained", checkpoint=str(trained_dir)))
    batch = random_images(7)
    whole = encoder.encode_image(batch)
    chunked = encoder.encode_image(batch, batch_size=3)
    one_by_one = torch.cat([encoder.encode_image(batch[i : i + 1]) for i in range(7)])
    assert whole.shape == (7, 16)
    assert torch.allclose(whole.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(whole, chunked, atol=1e-5)
    assert torch.allclose(whole, one_by_one, atol=1e-5)
    text = encoder.encode_text(CAPTIONS)
    assert text.shape == (3, 16)
    assert torch.allclose(text.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text[1:], encoder.encode_text(CAPTIONS[1:]), atol=1e-5)
    assert not whole.requires_grad and encoder.encode_text([]).shape == (0, 16)


def test_images_are_resized_to_the_model_input(trained_dir):
    encoder = load_clip(CLIPConfig(source="trained", checkpoint=str(trained_dir)))
    small = random_images(2)
    large = F.interpolate((small + 1) / 2, size=64, mode="nearest") * 2 - 1  # (2, 3, 64, 64)
    assert encoder.preprocess(large).shape == (2, 3, 32, 32)
    similarity = (encoder.encode_image(large) * encoder.encode_image(small)).sum(dim=1)
    assert torch.all(similarity > 0.95)


def test_bad_inputs_raise_clear_errors(trained_dir):
    encoder = load_clip(CLIPConfig(source="trained", checkpoint=str(trained_dir)))
    with pytest.raises(TypeError, match="list of captions"):
        encoder.encode_text("a red circle")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder.encode_image(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float images"):
        encoder.encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# Bad configs and paths


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "hub"}, "clip.source"),
        ({"source": "file"}, "clip.checkpoint"),
        ({"source": "trained", "image_size": 30, "patch_size": 4}, "multiple of clip.patch_size"),
        ({"source": "trained", "text_width": 30, "text_heads": 4}, "text_heads"),
        ({"source": "trained", "vision_layers": 0}, "vision_layers"),
        ({"source": "trained", "context_length": 2}, "context_length"),
        ({"source": "trained", "vision_pos_embed": "rope"}, "vision_pos_embed"),
        ({"source": "trained", "image_size": 36, "patch_size": 6, "conv_stem": 8}, "power of two"),
        ({"source": "trained", "conv_stem": -1}, "conv_stem"),
    ],
)
def test_bad_config_values_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        CLIPConfig(**fields)


@pytest.mark.parametrize("preset", ["shapes", "tiny", "pictures"])
def test_every_setting_of_the_small_clip_is_in_each_of_its_presets(preset):
    """So that `clip.<field>=...` overrides any of them; Hydra refuses a key the preset lacks."""
    zoo_only = {"model_name", "pretrained", "cache_dir", "quick_gelu"}
    fields = {field.name for field in dataclasses.fields(CLIPConfig)} - zoo_only
    assert fields <= set(OmegaConf.load(ROOT / "conf" / "clip" / f"{preset}.yaml"))


def test_bad_names_and_paths_say_what_to_do(tiny_arch, tmp_path):
    with pytest.raises(ValueError, match="did you mean ViT-B-32"):
        load_clip(CLIPConfig(source="pretrained", model_name="ViT-B32"))
    with pytest.raises(ValueError, match="set clip.pretrained to one of"):
        load_clip(CLIPConfig(source="pretrained", model_name="ViT-B-32", pretrained="nope"))
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="set clip.checkpoint"):
        load_clip(CLIPConfig(source="file", model_name=tiny_arch, checkpoint=str(missing)))
    with pytest.raises(FileNotFoundError, match="scripts/train_clip.py"):
        load_clip(CLIPConfig(source="trained"), run_dir=tmp_path)
    with pytest.raises(ValueError, match="pass run_dir"):
        load_clip(CLIPConfig(source="trained"))


def test_a_checkpoint_of_another_architecture_is_refused(tiny_checkpoint):
    config = CLIPConfig(source="file", model_name="RN50", checkpoint=str(tiny_checkpoint))
    with pytest.raises(ValueError, match="set clip.model_name to the checkpoint's architecture"):
        load_clip(config)


def test_a_trained_folder_that_does_not_match_its_config_is_refused(trained_dir, tmp_path):
    other = CLIPConfig(source="trained", **{**TINY_SMALL, "embed_dim": 8})
    save_trained_clip(build_small_clip(other), other, tmp_path)
    (tmp_path / "config.json").write_text((trained_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="export the CLIP again"):
        load_clip(CLIPConfig(source="trained", checkpoint=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# Distinct-caption batches


def one_object(color: str, background: str = "white") -> Scene:
    return Scene((ShapeObject("circle", color, "small", "left"),), background)


def test_batches_keep_no_two_items_that_one_caption_describes():
    image = torch.zeros(3, 32, 32)
    red_white, red_black, blue = one_object("red"), one_object("red", "black"), one_object("blue")
    items = [
        CaptionedImage(image, canonical_caption(red_white), red_white),
        CaptionedImage(image, "red circle, left, small", red_white),  # same scene
        CaptionedImage(image, canonical_caption(red_black), red_black),  # first caption fits not
        CaptionedImage(image, "a small blue circle on the left", blue),
        CaptionedImage(image, "a small red circle on the left", red_black),  # fits red_white too
        CaptionedImage(image, "", blue),  # no caption
    ]
    batch = DistinctCaptions()(items)
    assert batch.captions == [items[0].caption, items[2].caption, items[3].caption]
    assert batch.images.shape == (3, 3, 32, 32)
    duplicates = [CaptionedImage(image, text, None) for text in ("a cat", "A cat ", "a dog")]
    assert DistinctCaptions()(duplicates).captions == ["a cat", "a dog"]


def test_training_captions_can_be_canonical_and_validation_keeps_the_sampled_ones():
    config = DataConfig(num_train=16, num_val=16, batch_size=16, num_workers=0)
    module = CaptionDataModule(config, canonical_fraction=1.0)

    def captions(split: str) -> tuple[set[str], set[str]]:
        examples = [build_dataset(config, split).example(i) for i in range(16)]
        return {e.caption for e in examples}, {canonical_caption(e.scene) for e in examples}

    train = next(iter(module.train_dataloader())).captions
    assert len(train) >= 8 and set(train) <= captions("train")[1]
    validation = next(iter(module.val_dataloader())).captions
    sampled, canonical = captions("val")
    assert set(validation) <= sampled and not set(validation) <= canonical
    with pytest.raises(ValueError, match="canonical_captions"):
        CaptionDataModule(config, canonical_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# scripts/train_clip.py

TRAIN = [
    "clip=tiny",
    "data.batch_size=48",
    "data.num_workers=0",
    "data.num_train=2000",
    "data.num_val=48",
    "data.num_test=200",
    "eval_images=200",
    "optim.warmup_steps=5",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def train_clip(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "train_clip.py"), f"run_dir={run_dir}"]
    result = subprocess.run(
        [*command, *TRAIN, *overrides], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "logs" / "clip" / "metrics.csv") as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row["train/loss"]]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("clip_run")
    return run_dir, train_clip(run_dir, "trainer.max_steps=40", "checkpoint_every_n_steps=20")


def checkpoint_clip(run_dir: Path) -> CLIPEncoder:
    """The CLIP in the last Lightning checkpoint, read without the exported files."""
    checkpoint = torch.load(run_dir / "checkpoints" / "clip" / "last.ckpt", weights_only=True)
    config = CLIPConfig(**checkpoint["hyper_parameters"]["clip"])
    model = build_small_clip(config)
    prefix = "model."
    model.load_state_dict(
        {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    )
    return CLIPEncoder(model, clip_tokenizer(config), ImagePreprocess.of(model), config, 16)


def test_training_lowers_the_loss_and_exports_the_trained_clip(trained_run):
    run_dir, result = trained_run
    losses = train_losses(run_dir)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    exported = load_clip(CLIPConfig(source="trained"), run_dir)
    trained = checkpoint_clip(run_dir)
    batch = random_images(6)
    assert torch.equal(exported.encode_image(batch), trained.encode_image(batch))
    assert torch.equal(exported.encode_text(CAPTIONS), trained.encode_text(CAPTIONS))
    summary = json.loads(result.stdout.strip().splitlines()[-1])["clip_retrieval"]
    assert set(summary) == {"seen", "held_out", "held_out_among_held_out"}
    assert summary["seen"]["num_images"] > 0
    probe = json.loads(result.stdout.strip().splitlines()[-1])["clip_swap_probe"]
    assert set(probe) == {"color", "shape", "size", "relation"}
    assert probe["relation"]["num_images"] > 0 and 0 <= probe["relation"]["percent_right"] <= 100


@pytest.mark.slow
def test_rerun_resumes_from_the_last_checkpoint(trained_run):
    run_dir, _ = trained_run
    result = train_clip(run_dir, "trainer.max_steps=50")
    assert "Resuming from" in result.stdout
    checkpoint = torch.load(run_dir / "checkpoints" / "clip" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 50
