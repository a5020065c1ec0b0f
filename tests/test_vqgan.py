"""The VQ-GAN and its evaluation: encode and decode shapes, export and loading, PSNR, Fréchet distance and the checker ratio."""

import json

import pytest
import torch

from tokenizer import VQGAN, QuantizerConfig, VQGANConfig, shapes
from tokenizer.data import Sample
from tokenizer.evaluation import FeatureExtractor, evaluate_tokenizer
from tokenizer.vqgan import AttentionBlock

FACTOR_MULTIPLIERS = {4: (1, 2, 2), 8: (1, 1, 2, 2), 16: (1, 1, 2, 2, 2)}


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_encode_decode_shapes_for_each_downsampling_factor(factor):
    torch.manual_seed(0)
    config = VQGANConfig.tiny(image_size=64, channel_multipliers=FACTOR_MULTIPLIERS[factor])
    assert config.downsample_factor == factor
    model = VQGAN(config).eval()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 64 // factor, 64 // factor)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < model.num_codes
    assert config.grid_size == tuple(codes.shape[1:])
    decoded = model.decode(codes)
    assert decoded.shape == images.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_forward_matches_encode_then_decode_in_eval():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny()).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = model(images)
    codes = model.encode(images)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.reconstructions.clamp(-1, 1), model.decode(codes))


def test_attention_free_model_and_tokenizers_saved_before_the_option(tmp_path):
    """`attention_resolutions=[]` with `middle_attention=False` is a fully convolutional VQGAN;
    a tokenizer whose config.json predates `middle_attention` keeps its middle attention."""
    without = VQGAN(VQGANConfig.tiny(attention_resolutions=(), middle_attention=False)).eval()
    assert not any(isinstance(module, AttentionBlock) for module in without.modules())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert without(images).reconstructions.shape == images.shape

    torch.manual_seed(0)
    older = VQGAN(VQGANConfig.tiny(attention_resolutions=())).eval()
    older.save_pretrained(tmp_path / "tokenizer")
    config_file = tmp_path / "tokenizer" / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["middle_attention"]
    config_file.write_text(json.dumps(saved))
    loaded = VQGAN.from_pretrained(tmp_path / "tokenizer")
    assert loaded.config.middle_attention
    assert torch.equal(loaded.encode(images), older.encode(images))


def test_encode_is_batched_consistently():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny()).eval()
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    together = model.encode(images)
    one_by_one = torch.cat([model.encode(image[None]) for image in images])
    assert torch.equal(together, one_by_one)


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    config = VQGANConfig.tiny(quantizer=QuantizerConfig(num_codes=32, code_dim=4, use_ema=True))
    model = VQGAN(config).eval()
    model.save_pretrained(tmp_path / "tokenizer")
    assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = VQGAN.from_pretrained(tmp_path / "tokenizer")
    assert loaded.config == config
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_loading_refuses_a_config_that_does_not_match_the_weights(tmp_path):
    model = VQGAN(VQGANConfig.tiny())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latent_dim"] = 24
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="re-export"):
        VQGAN.from_pretrained(tmp_path)


def test_loading_refuses_unknown_fields_and_missing_folders(tmp_path):
    VQGAN(VQGANConfig.tiny()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(ValueError, match="surprise"):
        VQGAN.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        VQGAN.from_pretrained(tmp_path / "nowhere")


def test_image_size_must_divide_by_the_factor():
    with pytest.raises(ValueError, match="not divisible"):
        VQGANConfig.tiny(image_size=36, channel_multipliers=(1, 2, 2, 2))


def test_wrong_image_size_is_a_clear_error():
    model = VQGAN(VQGANConfig.tiny())
    with pytest.raises(ValueError, match="image_size=32"):
        model.encode(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize("num_images", [1, 3])
def test_evaluation_gives_a_frechet_distance_from_two_images_on(num_images):
    """A covariance needs two images: with one, the distance is None instead of an error."""
    images = torch.rand(num_images, 3, 32, 32) * 2 - 1
    batches = [Sample(images, [""] * num_images)]
    features = FeatureExtractor(lambda x: x.mean(dim=(2, 3)), dim=3)
    metrics = evaluate_tokenizer(
        VQGAN(VQGANConfig.tiny()),
        batches,
        max_images=8,
        use_checker=False,
        frechet_features=features,
    )
    assert metrics.num_images == num_images
    assert (metrics.frechet_distance is None) == (num_images == 1)


class LosesHeldOutPairs(torch.nn.Module):
    """A stand-in tokenizer that gives each image back, except that images of a held-out
    colour-shape pair come back blank."""

    num_codes = 4

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.images = images
        return torch.zeros(images.shape[0], 2, 2, dtype=torch.long)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        held_out = [shapes.is_held_out(scene) for scene in shapes.check_batch(self.images)]
        return torch.where(torch.tensor(held_out).view(-1, 1, 1, 1), 1.0, self.images)


def test_checker_ratio_is_split_by_colour_shape_pair():
    scenes = [
        shapes.Scene((shapes.ShapeObject("circle", "red", "large", "center"),), "white"),
        shapes.Scene((shapes.ShapeObject("triangle", "green", "small", "top left"),), "black"),
    ]
    images = torch.stack([torch.from_numpy(shapes.draw(scene, 32)) for scene in scenes])
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    batches = [Sample(images, [shapes.canonical_caption(scene) for scene in scenes])]
    metrics = evaluate_tokenizer(LosesHeldOutPairs(), batches, max_images=2, use_checker=True)
    assert metrics.checker_accuracy_originals == 1.0
    assert metrics.checker_ratio == 0.5
    assert metrics.checker_ratio_by_pair == {"seen": 1.0, "held_out": 0.0}
