"""CLIP token features: the text tower's per-token output and the vision tower's per-patch
output, for every CLIP source, pooling to exactly the embeddings encode_text/encode_image give."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import random_images, save_clip, save_small_clip
from safetensors.torch import save_file

from generator.clip import CLIPConfig, CLIPEncoder, ImagePreprocess, load_clip, text_feature_shape

CAPTIONS = ["a small red circle in the center on a white background", "a blue square", "x"]
WORDS = [11, 3, 1]  # BPE tokens of each caption, start and end tokens not counted
TEXT_TOWER = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
VIT = {"image_size": 32, "layers": 1, "width": 24, "head_width": 8, "patch_size": 8}
ARCHS = {  # open_clip architectures registered for these tests, as a user's model config would be
    "tokens-vit": {"embed_dim": 16, "vision_cfg": VIT, "text_cfg": TEXT_TOWER},
    "tokens-custom-text": {
        "embed_dim": 16,
        "custom_text": True,
        "vision_cfg": {**VIT, "pool_type": "avg"},
        "text_cfg": {**TEXT_TOWER, "pool_type": "last", "no_causal_mask": True},
    },
    "tokens-resnet": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
        "text_cfg": TEXT_TOWER,
    },
}


@pytest.fixture(scope="module")
def archs(tmp_path_factory) -> dict[str, Path]:
    """Each test architecture registered with open_clip, and a random checkpoint of it."""
    folder = tmp_path_factory.mktemp("archs")
    checkpoints = {}
    for name, config in ARCHS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")
        torch.manual_seed(0)
        state = open_clip.create_model(name).state_dict()
        checkpoints[name] = folder / f"{name}.safetensors"
        save_file({key: t.contiguous() for key, t in state.items()}, str(checkpoints[name]))
    return checkpoints


def file_clip(archs: dict[str, Path], name: str) -> CLIPEncoder:
    return load_clip(CLIPConfig(source="file", model_name=name, checkpoint=str(archs[name])))


def zoo_clip(name: str) -> CLIPEncoder:
    """An architecture of open_clip's zoo with random weights, wrapped as zoo.py wraps it."""
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    config = CLIPConfig(source="pretrained", model_name=name)
    return CLIPEncoder(
        model, open_clip.get_tokenizer(name), ImagePreprocess.of(model), config, embed_dim
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> CLIPEncoder:
    run_dir = tmp_path_factory.mktemp("run")
    save_clip(run_dir)
    return load_clip(CLIPConfig(source="trained"), run_dir)


@pytest.fixture(scope="module")
def trained_stem(tmp_path_factory) -> CLIPEncoder:
    """A small trained CLIP whose patches a convolutional stem embeds."""
    directory = tmp_path_factory.mktemp("run") / "clip"
    save_small_clip(directory, conv_stem=8)
    return load_clip(CLIPConfig(source="trained", checkpoint=str(directory)))


@pytest.fixture(scope="module")
def pretrained(archs) -> CLIPEncoder:
    """source=pretrained through a zoo tag whose weights are already on disk."""
    zoo = open_clip.pretrained._PRETRAINED  # open_clip has no public API to add a tag
    zoo["tokens-vit"] = {"local": {"file": str(archs["tokens-vit"])}}
    try:
        return load_clip(
            CLIPConfig(source="pretrained", model_name="tokens-vit", pretrained="local")
        )
    finally:
        del zoo["tokens-vit"]


@pytest.fixture(scope="module")
def vit_b_32() -> CLIPEncoder:
    return zoo_clip("ViT-B-32")


@pytest.fixture(params=["trained", "trained_stem", "file", "pretrained", "custom_text", "vit_b_32"])
def encoder(request, archs) -> CLIPEncoder:
    if request.param == "file":
        return file_clip(archs, "tokens-vit")
    if request.param == "custom_text":
        return file_clip(archs, "tokens-custom-text")
    return request.getfixturevalue(request.param)


def test_text_tokens_pool_to_encode_text_and_are_zero_at_padding(encoder):
    tokens = encoder.encode_text_tokens(CAPTIONS, batch_size=2)
    length, width = encoder.text_token_shape
    assert torch.allclose(tokens.pooled, encoder.encode_text(CAPTIONS), atol=1e-6, rtol=0)
    assert tokens.features.shape == (3, length, width) and tokens.features.dtype == torch.float32
    assert tokens.mask.dtype == torch.bool
    assert tokens.mask.sum(dim=1).tolist() == [words + 2 for words in WORDS]
    assert torch.all(tokens.mask[:, 0]) and not torch.any(tokens.mask[:, -1])
    assert torch.all(tokens.features[~tokens.mask] == 0)
    assert torch.all(tokens.features[tokens.mask].abs().sum(dim=-1) > 0)


def test_word_embeddings_sit_beside_the_last_hidden_states(encoder):
    last = encoder.encode_text_tokens(CAPTIONS)
    both = encoder.encode_text_tokens(CAPTIONS, batch_size=2, word_embeddings=True)
    length, width = encoder.text_token_shape
    assert both.features.shape == (3, length, 2 * width) == (3, *text_feature_shape(encoder, True))
    assert torch.allclose(both.pooled, last.pooled, atol=1e-6, rtol=0)
    assert torch.equal(both.mask, last.mask)
    assert torch.allclose(both.features[..., :width], last.features, atol=1e-5)
    words = both.features[..., width:]
    assert torch.all(words[~both.mask] == 0)
    text = encoder.model if isinstance(encoder.model, open_clip.CLIP) else encoder.model.text
    embedded = text.token_embedding(encoder.tokenize(CAPTIONS)) + text.positional_embedding
    expected = F.layer_norm(embedded, (width,))  # the tower's own tables, nothing mixed in
    assert torch.allclose(words[both.mask], expected[both.mask], atol=1e-5)


def test_a_word_embedding_is_the_same_whatever_words_come_before_it(trained):
    tokens = trained.encode_text_tokens(["a blue circle", "a red circle"], word_embeddings=True)
    width = trained.text_token_shape[1]
    circle = tokens.features[:, 3]  # start, "a", the colour, "circle"
    assert torch.equal(circle[0, width:], circle[1, width:])
    assert (circle[0, :width] - circle[1, :width]).abs().max() > 1e-2  # causal: it read the colour


def test_image_tokens_pool_to_encode_image_and_are_the_patches(encoder):
    images = random_images(3)
    tokens = encoder.encode_image_tokens(images, batch_size=2)
    patches, width = encoder.image_token_shape
    assert torch.allclose(tokens.pooled, encoder.encode_image(images), atol=1e-6, rtol=0)
    assert tokens.features.shape == (3, patches, width) and tokens.features.dtype == torch.float32
    visual = encoder.model.visual  # open_clip's own per-patch output, asked for directly
    visual.output_tokens = True
    try:
        _, expected = visual(encoder.preprocess(images))
    finally:
        visual.output_tokens = False
    assert torch.allclose(tokens.features, expected, atol=1e-5)


def test_text_features_are_what_the_tower_pools_and_projects(trained, vit_b_32):
    for encoder in (trained, vit_b_32):
        tokens = encoder.encode_text_tokens(CAPTIONS)
        ends = tokens.mask.sum(dim=1) - 1  # the end token, which open_clip's CLIP pools
        pooled = tokens.features[torch.arange(3), ends] @ encoder.model.text_projection
        assert torch.allclose(F.normalize(pooled, dim=-1), tokens.pooled, atol=1e-5)


def test_token_shapes_of_each_source(trained, pretrained, vit_b_32):
    assert trained.text_token_shape == (24, 16) and trained.image_token_shape == (16, 16)
    assert pretrained.text_token_shape == (16, 16) and pretrained.image_token_shape == (16, 24)
    assert vit_b_32.text_token_shape == (77, 512) and vit_b_32.image_token_shape == (49, 768)
    empty = trained.encode_text_tokens([])
    assert empty.pooled.shape == (0, 16) and empty.features.shape == (0, 24, 16)
    assert empty.mask.shape == (0, 24) and empty.mask.dtype == torch.bool
    no_images = trained.encode_image_tokens(torch.empty(0, 3, 32, 32))
    assert no_images.pooled.shape == (0, 16) and no_images.features.shape == (0, 16, 16)


def test_a_tower_without_token_output_says_which_clip_to_use(archs):
    resnet = file_clip(archs, "tokens-resnet")
    assert resnet.text_token_shape == (16, 16)
    for call in (
        lambda: resnet.image_token_shape,
        lambda: resnet.encode_image_tokens(random_images(1)),
    ):
        with pytest.raises(ValueError, match="ModifiedResNet.*no per-patch output.*ViT-B-32"):
            call()


def test_token_features_do_not_change_the_embeddings_or_the_model(trained):
    images = random_images(2)
    before = trained.encode_image(images), trained.encode_text(CAPTIONS)
    trained.encode_text_tokens(CAPTIONS)
    trained.encode_image_tokens(images)
    assert torch.equal(trained.encode_image(images), before[0])
    assert torch.equal(trained.encode_text(CAPTIONS), before[1])
    trained.encode_text_tokens(CAPTIONS, word_embeddings=True)
    assert not trained.model.ln_final._forward_hooks
    assert not trained.model.transformer._forward_pre_hooks
    assert not trained.model.visual.ln_post._forward_hooks
    with pytest.raises(TypeError, match="list of captions"):
        trained.encode_text_tokens("a red circle")
