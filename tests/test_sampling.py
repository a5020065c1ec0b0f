"""Sampling: filtering, the draw, guidance, seeds, prefix codes, and cached against naive generation."""

import math

import pytest
import torch

from generator.conditioning import Condition
from generator.gpt import GPT, GPTConfig
from generator.next_code_logits import CachedLogits, RecomputedLogits
from generator.sampling import (
    SamplingOptions,
    filter_logits,
    generate,
    generate_naive,
    sample_from_logits,
)

VOCAB_SIZE = 32
GRID_SIZE = (3, 5)
CLIP_DIM = 16
NUM_CODES = GRID_SIZE[0] * GRID_SIZE[1]
INF = math.inf


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny", vocab_size=VOCAB_SIZE, grid_size=GRID_SIZE, clip_dim=CLIP_DIM)
    return GPT(config).eval()


@pytest.fixture
def clip_embedding() -> torch.Tensor:
    return torch.randn(3, CLIP_DIM, generator=torch.Generator().manual_seed(1))


def greedy_reference(model: GPT, clip_embedding: torch.Tensor, drop: bool) -> torch.Tensor:
    """Greedy decoding written out with full forward passes, independent of the sampler."""
    batch_size = clip_embedding.shape[0]
    drop_condition = torch.full((batch_size,), drop)
    codes = torch.zeros(batch_size, NUM_CODES, dtype=torch.long)
    with torch.no_grad():
        for t in range(NUM_CODES):
            logits = model(codes[:, : t + 1], Condition(clip_embedding, drop=drop_condition))
            codes[:, t] = logits[:, -1].argmax(dim=-1)
    return codes


# filtering


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 2.0]])
    filtered = filter_logits(logits, top_k=2)
    expected = torch.tensor([[-INF, 3.0, 2.0, -INF], [-INF, -INF, 4.0, 2.0]])
    torch.testing.assert_close(filtered, expected)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.4, [[1], [3]]),  # the most likely code alone already holds 0.5
        (0.75, [[1, 2], [3, 0]]),  # 0.5 + 0.3 reaches 0.75
        (0.85, [[1, 2, 3], [3, 0, 1]]),
        (1.0, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.3, 0.15, 0.05, 0.5]])
    logits = probs.log()
    filtered = filter_logits(logits, top_p=top_p)
    for row, kept_codes in enumerate(kept):
        expected = torch.full((4,), -INF)
        expected[kept_codes] = logits[row, kept_codes]
        torch.testing.assert_close(filtered[row], expected)


def test_top_k_and_top_p_together():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # top_k=3 renormalises to 0.44, 0.33, 0.22: the nucleus of 0.7 then needs two codes
    filtered = filter_logits(probs.log(), top_k=3, top_p=0.7)
    assert torch.isfinite(filtered).tolist() == [[True, True, False, False]]


def test_sampling_never_draws_a_filtered_code():
    logits = torch.tensor([0.0, 2.0, 1.0, 3.0, -1.0]).expand(2000, 5)
    generator = torch.Generator().manual_seed(0)
    codes = sample_from_logits(logits, SamplingOptions(top_k=2), generator)
    assert set(codes.tolist()) == {1, 3}
    # and draws the rest in proportion: softmax([2, 3]) gives code 3 about 73% of the time
    assert 0.68 < (codes == 3).float().mean() < 0.78


def test_a_draw_at_the_top_of_the_range_still_lands_on_a_kept_code(monkeypatch):
    logits = torch.tensor([[1.0, 2.0, 0.5, -9.0, -8.0]])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.ones(1, 1))  # U = 1
    assert sample_from_logits(logits, SamplingOptions(top_k=3)).tolist() == [
        2
    ]  # the last kept code
    assert sample_from_logits(logits).tolist() == [4]


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([0.0, 1.0]).expand(4000, 2)
    generator = torch.Generator().manual_seed(0)
    cold = sample_from_logits(logits, SamplingOptions(temperature=0.25), generator).float().mean()
    hot = sample_from_logits(logits, SamplingOptions(temperature=4.0), generator).float().mean()
    assert cold > 0.95  # sigmoid(4) = 0.98
    assert 0.5 < hot < 0.6  # sigmoid(0.25) = 0.56


# the cache against the full forward pass


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_logits_match_the_full_forward_pass_at_every_step(model, clip_embedding, cfg_scale):
    codes = torch.randint(0, VOCAB_SIZE, (3, NUM_CODES), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        conditional = model(codes, Condition(clip_embedding, drop=torch.zeros(3, dtype=torch.bool)))
        unconditional = model(
            codes, Condition(clip_embedding, drop=torch.ones(3, dtype=torch.bool))
        )
        expected = unconditional + cfg_scale * (conditional - unconditional)  # (B, T, vocab)
        source = CachedLogits(model, clip_embedding, cfg_scale)
        assert source.cache.batch_size == (6 if cfg_scale != 1 else 3)  # one batch for both
        logits = source.start()
        for t in range(NUM_CODES):
            torch.testing.assert_close(logits, expected[:, t], atol=1e-5, rtol=1e-5)
            if t + 1 < NUM_CODES:
                logits = source.advance(codes[:, t])


def test_cached_and_recomputed_logits_agree_after_prefix_codes(model, clip_embedding):
    codes = torch.randint(0, VOCAB_SIZE, (3, NUM_CODES), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = CachedLogits(model, clip_embedding, 2.0, prefix_codes=codes[:, :5])
        recomputed = RecomputedLogits(model, clip_embedding, 2.0, prefix_codes=codes[:, :5])
        torch.testing.assert_close(cached.start(), recomputed.start(), atol=1e-5, rtol=1e-5)
        for t in range(5, NUM_CODES - 1):
            torch.testing.assert_close(
                cached.advance(codes[:, t]),
                recomputed.advance(codes[:, t]),
                atol=1e-5,
                rtol=1e-5,
            )


@pytest.mark.parametrize(
    ("options", "prefix_codes"),
    [
        ({}, None),
        ({"cfg_scale": 3.0, "top_k": 8}, None),
        ({"cfg_scale": 0.0, "top_p": 0.9, "temperature": 0.7}, None),
        ({"cfg_scale": 2.0}, torch.arange(3 * 5).reshape(3, 5) % VOCAB_SIZE),
    ],
)
def test_cached_and_naive_generate_give_the_same_codes(
    model, clip_embedding, options, prefix_codes
):
    options = SamplingOptions(seed=7, **options)
    cached = generate(model, clip_embedding, options, prefix_codes=prefix_codes)
    naive = generate_naive(model, clip_embedding, options, prefix_codes=prefix_codes)
    assert cached.shape == (3, NUM_CODES) and cached.dtype == torch.long
    assert ((cached >= 0) & (cached < VOCAB_SIZE)).all()
    torch.testing.assert_close(cached, naive, rtol=0, atol=0)


# guidance, greedy decoding and seeds


def test_cfg_scale_one_is_plain_conditional_sampling(model, clip_embedding):
    greedy = generate(model, clip_embedding, SamplingOptions(top_k=1, cfg_scale=1.0))
    torch.testing.assert_close(greedy, greedy_reference(model, clip_embedding, drop=False))


def test_cfg_scale_zero_ignores_the_condition(model, clip_embedding):
    greedy = generate(model, clip_embedding, SamplingOptions(top_k=1, cfg_scale=0.0))
    unconditional = greedy_reference(model, clip_embedding, drop=True)
    torch.testing.assert_close(greedy, unconditional)
    # the two references differ, so the two tests above tell the halves apart
    assert (unconditional != greedy_reference(model, clip_embedding, drop=False)).any()


def test_guidance_changes_the_samples(model, clip_embedding):
    plain = generate(model, clip_embedding, SamplingOptions(top_k=1, cfg_scale=1.0))
    guided = generate(model, clip_embedding, SamplingOptions(top_k=1, cfg_scale=4.0))
    assert (plain != guided).any()


def test_top_k_one_is_greedy_whatever_the_seed(model, clip_embedding):
    first = generate(model, clip_embedding, SamplingOptions(top_k=1, cfg_scale=2.0, seed=0))
    second = generate(model, clip_embedding, SamplingOptions(top_k=1, cfg_scale=2.0, seed=1))
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_seeds_make_samples_reproducible(model, clip_embedding):
    first = generate(model, clip_embedding, SamplingOptions(seed=0))
    torch.testing.assert_close(
        generate(model, clip_embedding, SamplingOptions(seed=0)), first, rtol=0, atol=0
    )
    assert (generate(model, clip_embedding, SamplingOptions(seed=1)) != first).any()
    from_generator = generate(model, clip_embedding, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_generator, first, rtol=0, atol=0)


def test_seed_leaves_the_global_generator_alone(model, clip_embedding):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, clip_embedding, SamplingOptions(seed=0))
    torch.testing.assert_close(torch.rand(3), expected)


def test_samples_the_same_in_train_mode_and_restores_it():
    torch.manual_seed(0)
    config = GPTConfig.preset(
        "tiny", vocab_size=VOCAB_SIZE, grid_size=GRID_SIZE, clip_dim=CLIP_DIM, dropout=0.5
    )
    model = GPT(config)
    clip_embedding = torch.randn(2, CLIP_DIM)
    in_train_mode = generate(
        model, clip_embedding, SamplingOptions(top_k=1)
    )  # greedy: dropout would show
    assert model.training
    expected = generate(model.eval(), clip_embedding, SamplingOptions(top_k=1))
    torch.testing.assert_close(in_train_mode, expected, rtol=0, atol=0)


def test_the_sampling_loop_never_reads_a_tensor_back(model, clip_embedding, monkeypatch):
    """Reading a value back (item, bool, int, ...) would stall a GPU at every step."""

    def refuse(*args, **kwargs):
        raise AssertionError("the sampling loop read a tensor value back to Python")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    generate(model, clip_embedding, SamplingOptions(cfg_scale=3.0, top_k=8, top_p=0.9, seed=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to watch for syncs")
def test_generate_does_not_synchronise_with_the_gpu(model, clip_embedding):
    model, clip_embedding = model.cuda(), clip_embedding.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        generate(model, clip_embedding, SamplingOptions(cfg_scale=3.0, top_k=8, top_p=0.9, seed=0))
    finally:
        torch.cuda.set_sync_debug_mode("default")


# prefix codes


def test_prefix_codes_are_kept_exactly(model, clip_embedding):
    top_rows = torch.randint(0, VOCAB_SIZE, (3, 2 * GRID_SIZE[1]))
    codes = generate(model, clip_embedding, SamplingOptions(seed=0), prefix_codes=top_rows)
    torch.testing.assert_close(codes[:, : top_rows.shape[1]], top_rows, rtol=0, atol=0)
    assert codes.shape == (3, NUM_CODES)


def test_prefix_codes_condition_the_rest(model, clip_embedding):
    zeros = torch.zeros(3, 5, dtype=torch.long)
    ones = torch.ones(3, 5, dtype=torch.long)
    after_zeros = generate(model, clip_embedding, SamplingOptions(top_k=1), prefix_codes=zeros)
    after_ones = generate(model, clip_embedding, SamplingOptions(top_k=1), prefix_codes=ones)
    assert (after_zeros[:, 5:] != after_ones[:, 5:]).any()


def test_a_full_prefix_is_returned_as_is(model, clip_embedding):
    full = torch.randint(0, VOCAB_SIZE, (3, NUM_CODES))
    torch.testing.assert_close(generate(model, clip_embedding, prefix_codes=full), full)


# invalid parameters


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": VOCAB_SIZE + 1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"clip_embedding": torch.randn(CLIP_DIM)}, "clip_embedding"),
        ({"clip_embedding": torch.randn(3, CLIP_DIM + 1)}, "clip_embedding"),
        ({"prefix_codes": torch.zeros(2, 5, dtype=torch.long)}, "prefix_codes"),
        ({"prefix_codes": torch.zeros(3, NUM_CODES + 1, dtype=torch.long)}, "prefix_codes"),
        ({"prefix_codes": torch.full((3, 5), VOCAB_SIZE)}, "prefix_codes"),
        ({"prefix_codes": torch.zeros(3, 5)}, "integer"),
        ({"seed": 0, "generator": torch.Generator()}, "either seed or generator"),
    ],
)
@pytest.mark.parametrize("sampler", [generate, generate_naive])
def test_invalid_parameters_raise_before_any_work(model, clip_embedding, sampler, options, message):
    calls = []
    model.conditioner.condition_mlp.register_forward_hook(lambda *args: calls.append(1))
    options, inputs = (
        dict(options),
        {"clip_embedding": clip_embedding, "prefix_codes": None, "generator": None},
    )
    inputs.update((name, options.pop(name)) for name in list(options) if name in inputs)
    with pytest.raises(ValueError, match=message):
        sampler(model, inputs.pop("clip_embedding"), SamplingOptions(**options), **inputs)
    assert not calls
    sampler(model, clip_embedding)
    assert calls  # the hook does see the model run
