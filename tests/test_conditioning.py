"""The fusion mechanisms: each one's cached sampling against its full forward pass, the nulls of
every input, deep fusion's closed gates, and padding that is never read."""

import pytest
import torch
from helpers import FakeCLIP, make_encoded_run, run_script, save_tokenizer, shapes_config

from generator.conditioning import FUSIONS, Condition
from generator.conditioning.condition import distinct_rows
from generator.conditioning.cross_attention import CrossAttention
from generator.cpu_step import OneCodeStep
from generator.encoding import encode_run
from generator.export import load_generator
from generator.gpt import GPT, GPTConfig
from generator.pipeline import Pipeline
from generator.sampling import SamplingOptions, generate, generate_naive
from tokenizer import VQGAN

VOCAB_SIZE = 32
GRID_SIZE = (3, 4)
NUM_CODES = GRID_SIZE[0] * GRID_SIZE[1]
CLIP_DIM = 16
TOKENS = 6  # L, the CLIP's context length
TOKEN_DIM = 12  # W, the CLIP text width


def fusion_model(fusion: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig.preset(
        "tiny",
        vocab_size=VOCAB_SIZE,
        grid_size=GRID_SIZE,
        clip_dim=CLIP_DIM,
        fusion=fusion,
        token_dim=TOKEN_DIM if fusion != "pooled" else 0,
        num_condition_tokens=TOKENS if fusion != "pooled" else 0,
        num_latents=3,
        num_layers=3,
        **overrides,
    )
    model = GPT(config).eval()
    with torch.no_grad():  # open deep fusion's gates, so that its blocks count
        for block in model.cross_blocks.values():
            block.attention_gate.fill_(0.7)
            block.mlp_gate.fill_(-0.4)
    return model


def condition(batch_size: int, seed: int = 1, **extra) -> Condition:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.arange(batch_size) % (TOKENS - 1) + 2  # 2 .. TOKENS real tokens
    mask = torch.arange(TOKENS)[None] < lengths[:, None]
    tokens = torch.randn(batch_size, TOKENS, TOKEN_DIM, generator=generator) * mask[..., None]
    pooled = torch.randn(batch_size, CLIP_DIM, generator=generator)
    return Condition(pooled, tokens, mask, **extra)


def codes_for(batch_size: int) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch_size, NUM_CODES), generator=torch.Generator())


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("batch_size", [1, 3])
@torch.no_grad()
def test_one_code_steps_match_the_full_forward_pass(fusion, batch_size):
    model = fusion_model(fusion)
    cond = condition(batch_size, drop=torch.arange(batch_size) == 1)
    codes = codes_for(batch_size)
    full = model(codes, cond)  # (B, T, vocab)
    assert full.shape == (batch_size, NUM_CODES, VOCAB_SIZE)
    cache = model.new_cache(batch_size)
    step = OneCodeStep(model, batch_size)
    torch.testing.assert_close(model.prefill(cond, cache), full[:, 0], atol=1e-5, rtol=1e-5)
    for t in range(NUM_CODES - 1):
        logits = step(codes[:, t], cache)
        torch.testing.assert_close(logits, full[:, t + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("repeats", [1, 4])  # 4: candidates of one prompt, the prefix run once
def test_cached_and_naive_sampling_give_the_same_codes(fusion, cfg_scale, repeats):
    model = fusion_model(fusion)
    options = SamplingOptions(cfg_scale=cfg_scale, top_k=8, seed=3)
    cached = generate(model, condition(3).repeat_interleave(repeats), options)
    naive = generate_naive(model, condition(3).repeat_interleave(repeats), options)
    assert torch.equal(cached, naive)


def stacked(*rows: Condition) -> Condition:
    return Condition(*(torch.cat(tensors) for tensors in zip(*rows, strict=True)))


def test_rows_are_alike_where_the_generator_reads_the_same():
    first, second = condition(2, seed=1).rows(slice(0, 1)), condition(2, seed=2).rows(slice(1, 2))
    no, yes = torch.tensor([False]), torch.tensor([True])
    padding = torch.randn_like(first.tokens) * ~first.mask[..., None]

    def row(base: Condition, drop=no, drop_tokens=no, tokens=None) -> Condition:
        tokens = base.tokens if tokens is None else tokens
        return base._replace(tokens=tokens, drop=drop, drop_tokens=drop_tokens)

    batch = stacked(
        row(first),
        row(second),
        row(first, tokens=first.tokens + padding),  # what padding holds is never read
        row(first, drop=yes),
        row(second, drop=yes),  # every dropped row reads the same nulls
        row(first, drop_tokens=yes),
        row(first, drop_tokens=yes, tokens=second.tokens),  # its tokens read their null
        row(second, drop_tokens=yes),  # but its pooled embedding is its own
    )
    distinct = distinct_rows(batch)
    groups = {}
    for index, group in enumerate(distinct.inverse.tolist()):
        groups.setdefault(group, []).append(index)
    assert sorted(groups.values()) == [[0, 2], [1], [3, 4], [5, 6], [7]]
    assert sorted(distinct.first.tolist()) == [0, 1, 3, 5, 7]
    codes = torch.arange(8)[:, None] % 2  # given codes tell rows apart too
    assert len(distinct_rows(batch, codes).first) == 7


@pytest.mark.parametrize("fusion", FUSIONS)
@torch.no_grad()
def test_a_prefix_alike_for_many_rows_runs_once_and_fills_every_row(fusion, monkeypatch):
    model = fusion_model(fusion)
    cond = condition(2).repeat_interleave(3).guided()  # 12 rows: 2 conditions, 1 null
    codes = codes_for(12)
    full = model(codes, cond)
    prefix_rows = []
    prefix = model.conditioner.prefix
    monkeypatch.setattr(
        model.conditioner, "prefix", lambda c: prefix_rows.append(c.batch_size) or prefix(c)
    )
    cache = model.new_cache(12)
    torch.testing.assert_close(model.prefill(cond, cache), full[:, 0], atol=1e-5, rtol=1e-5)
    assert prefix_rows == [3]
    step = OneCodeStep(model, 12)
    for t in range(NUM_CODES - 1):
        logits = step(codes[:, t], cache)
        torch.testing.assert_close(logits, full[:, t + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
@torch.no_grad()
def test_a_dropped_condition_is_the_null_of_every_input(fusion):
    model = fusion_model(fusion)
    codes = codes_for(2)
    dropped = torch.ones(2, dtype=torch.bool)
    one = model(codes, condition(2, seed=1, drop=dropped))
    other = model(codes, condition(2, seed=2, drop=dropped))
    torch.testing.assert_close(one, other, rtol=0, atol=0)
    no_tokens = model(codes, Condition(torch.randn(2, CLIP_DIM), drop=dropped))
    torch.testing.assert_close(one, no_tokens, rtol=0, atol=0)
    kept = model(codes, condition(2, seed=1, drop=~dropped))
    assert not torch.allclose(one, kept)


@pytest.mark.parametrize("fusion", ["early", "resampler", "deep"])
@torch.no_grad()
def test_dropped_tokens_read_their_null_and_keep_the_pooled_embedding(fusion):
    model = fusion_model(fusion)
    codes = codes_for(2)
    drop_tokens = torch.ones(2, dtype=torch.bool)
    one = condition(2, seed=1, drop_tokens=drop_tokens)
    other = condition(2, seed=2, drop_tokens=drop_tokens)._replace(pooled=one.pooled)
    torch.testing.assert_close(model(codes, one), model(codes, other), rtol=0, atol=0)
    torch.testing.assert_close(
        model(codes, one), model(codes, Condition(one.pooled)), rtol=0, atol=0
    )
    assert not torch.allclose(model(codes, one), model(codes, one._replace(drop_tokens=None)))


@pytest.mark.parametrize("fusion", ["early", "resampler", "deep"])
@torch.no_grad()
def test_padding_positions_are_never_read(fusion):
    model = fusion_model(fusion)
    codes = codes_for(3)
    cond = condition(3)
    noise = torch.randn_like(cond.tokens) * ~cond.mask[..., None]
    changed = cond._replace(tokens=cond.tokens + noise)
    torch.testing.assert_close(model(codes, cond), model(codes, changed), rtol=0, atol=0)


@torch.no_grad()
def test_deep_fusion_starts_with_its_gates_closed():
    torch.manual_seed(0)
    config = GPTConfig.preset(
        "tiny",
        vocab_size=VOCAB_SIZE,
        grid_size=GRID_SIZE,
        clip_dim=CLIP_DIM,
        fusion="deep",
        token_dim=TOKEN_DIM,
        num_condition_tokens=TOKENS,
    )
    model = GPT(config).eval()
    assert len(model.cross_blocks) == 1  # 2 layers, a block before every 2nd
    codes, cond = codes_for(2), condition(2)
    with_blocks = model(codes, cond)
    model.cross_blocks = torch.nn.ModuleDict()
    torch.testing.assert_close(model(codes, cond), with_blocks, rtol=0, atol=0)


def test_token_fusions_need_the_token_sizes():
    with pytest.raises(ValueError, match="tokens=true"):
        GPTConfig(vocab_size=8, grid_size=(2, 2), clip_dim=4, fusion="early")
    with pytest.raises(ValueError, match="fusion must be one of"):
        GPTConfig(vocab_size=8, grid_size=(2, 2), clip_dim=4, fusion="late")


def test_prefix_length_counts_what_each_fusion_adds():
    lengths = {fusion: fusion_model(fusion).config.prefix_length for fusion in FUSIONS}
    assert lengths == {"pooled": 4, "early": 4 + TOKENS, "resampler": 4 + 3, "deep": 4}


def test_condition_shapes_are_checked():
    model = fusion_model("early")
    with pytest.raises(ValueError, match="tokens must have shape"):
        model(codes_for(2), condition(2)._replace(tokens=torch.zeros(2, TOKENS + 1, TOKEN_DIM)))


def test_deep_fusion_computes_the_condition_keys_and_values_once_per_sample(monkeypatch):
    model = fusion_model("deep")
    calls = []
    keys_values = CrossAttention.keys_values
    monkeypatch.setattr(
        CrossAttention, "keys_values", lambda *args: calls.append(1) or keys_values(*args)
    )
    generate(model, condition(2), SamplingOptions(cfg_scale=2.0, seed=0))
    assert len(calls) == len(model.cross_blocks) == 2  # at prefill, never at a step


@pytest.mark.parametrize("fusion,words", [("early", False), ("deep", False), ("early", True)])
def test_train_generator_reads_token_features_from_the_shards(tmp_path, fusion, words):
    run_dir = tmp_path / "run"
    save_tokenizer(run_dir)
    config = shapes_config(num_train=16, num_val=4)
    encode_run(run_dir, config, FakeCLIP(), shard_size=8, tokens=True, word_embeddings=words)
    result = run_script(
        "train_generator.py",
        f"run_dir={run_dir}",
        "generator=tiny",
        f"generator.fusion={fusion}",
        "trainer.max_steps=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "samples.every_n_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, provenance = load_generator(run_dir / "generator")
    length, width = FakeCLIP().text_token_shape
    assert (model.config.fusion, model.config.num_condition_tokens) == (fusion, length)
    assert (model.config.token_dim, model.config.word_embeddings) == (width * (1 + words), words)
    vqgan = VQGAN.from_pretrained(run_dir / "tokenizer")
    pipeline = Pipeline(vqgan, FakeCLIP(), model, provenance)  # prompts read as in training
    prompts = ["a red circle", "a blue square left of a green triangle"]
    condition = pipeline.text_condition(prompts)
    assert condition.tokens.shape == (2, length, width * (1 + words))
    codes = generate(model, condition, SamplingOptions(seed=0))  # (2, h * w)
    assert codes.shape == (2, vqgan.config.grid_size[0] * vqgan.config.grid_size[1])


def test_train_generator_says_when_the_shards_lack_token_features(tmp_path):
    run_dir = make_encoded_run(tmp_path / "run")  # encoded without tokens
    result = run_script(
        "train_generator.py", f"run_dir={run_dir}", "generator=tiny", "generator.fusion=early"
    )
    assert result.returncode == 1
    assert "tokens=true" in result.stderr and "Traceback" not in result.stderr
