"""The GPT and its one-code step: shapes, embeddings, the KV cache and the fast step against the full forward pass."""

import ast
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from generator import cpu_step
from generator.conditioning import Condition, ConditionConfig, training_condition
from generator.cpu_step import (
    MAX_PACKED_ROWS,
    OneCodeStep,
    OneDNNPacked,
    ThreadBlocks,
    few_rows_product,
    gelu_by_aten,
    one_query_attention,
    packing,
    product_attention,
)
from generator.gpt import GPT, PRESETS, GPTConfig
from generator.kv_cache import KVCache
from generator.sampling import SamplingOptions, generate

VOCAB_SIZE = 32
GRID_SIZE = (3, 5)  # not square, so rows and columns cannot be mixed up unnoticed
CLIP_DIM = 16
NUM_CODES = GRID_SIZE[0] * GRID_SIZE[1]


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig.preset(
        "tiny", vocab_size=VOCAB_SIZE, grid_size=GRID_SIZE, clip_dim=CLIP_DIM, **overrides
    )


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def random_inputs(batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, VOCAB_SIZE, (batch_size, NUM_CODES), generator=generator)
    clip_embedding = torch.randn(batch_size, CLIP_DIM, generator=generator)
    return codes, clip_embedding


def test_tiny_preset_sizes_and_overrides():
    config = tiny_config(num_prefix_tokens=2)
    assert (config.dim, config.num_layers) == (64, 2)
    assert config.num_prefix_tokens == 2
    assert config.num_codes == NUM_CODES
    assert config.max_len == 2 + NUM_CODES - 1


def test_grid_size_from_a_list_becomes_a_tuple():
    config = GPTConfig(vocab_size=8, grid_size=[2, 3], clip_dim=4)
    assert config.grid_size == (2, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "divisible by num_heads"),
        ({"p_uncond": 1.5}, "p_uncond"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_prefix_tokens": 0}, "num_prefix_tokens"),
    ],
)
def test_invalid_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.preset("huge", vocab_size=8, grid_size=(2, 2), clip_dim=4)


def test_presets_grow_in_size():
    counts = []
    for name in ("tiny", "small", "base", "large"):
        config = GPTConfig.preset(name, vocab_size=1024, grid_size=(16, 16), clip_dim=512)
        with torch.device("meta"):  # counts parameters without allocating them
            counts.append(GPT(config).num_parameters())
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert set(PRESETS) == {"tiny", "small", "base", "large"}


def test_num_parameters_counts_every_tensor(model):
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters() > 0


def test_forward_gives_logits_for_every_code(model):
    codes, clip_embedding = random_inputs(batch_size=2)
    logits = model(codes, clip_embedding)
    assert logits.shape == (2, NUM_CODES, VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_forward_rejects_too_many_codes(model):
    codes, clip_embedding = random_inputs(batch_size=2)
    too_long = torch.cat([codes, codes[:, :1]], dim=1)
    with pytest.raises(ValueError, match="codes must have shape"):
        model(too_long, clip_embedding)
    with pytest.raises(ValueError, match="clip_embedding must have shape"):
        model(codes, clip_embedding[:1])


@pytest.mark.parametrize("t", [0, 6, NUM_CODES - 2])
def test_causality(model, t):
    codes, clip_embedding = random_inputs(batch_size=2)
    changed = codes.clone()
    changed[:, t] = (codes[:, t] + 1) % VOCAB_SIZE
    logits = model(codes, clip_embedding)
    changed_logits = model(changed, clip_embedding)
    # logits[:, i] predicts code i from codes before it: positions <= t cannot see code t
    torch.testing.assert_close(changed_logits[:, : t + 1], logits[:, : t + 1])
    assert not torch.allclose(changed_logits[:, t + 1], logits[:, t + 1])


def test_shorter_code_sequences_give_the_same_logits(model):
    codes, clip_embedding = random_inputs(batch_size=2)
    full = model(codes, clip_embedding)
    torch.testing.assert_close(model(codes[:, :4], clip_embedding), full[:, :4])


def test_every_grid_position_is_embedded_differently(model):
    same_code = torch.full((1, NUM_CODES), 3)
    embedded = model.embed_codes(same_code)[0]  # (T, C)
    distances = torch.cdist(embedded, embedded) + torch.eye(NUM_CODES)
    assert (distances > 1e-3).all()


def test_embedding_codes_from_an_offset_matches_the_whole_grid(model):
    codes, _ = random_inputs(batch_size=2)
    whole = model.embed_codes(codes)
    torch.testing.assert_close(model.embed_codes(codes[:, 4:9], start=4), whole[:, 4:9])


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("one_code_step", [False, True])
@torch.no_grad()
def test_cached_steps_match_the_full_forward_pass(
    model, batch_size, one_code_step, threads, monkeypatch
):
    """Through the modules' step, and through a OneCodeStep on packed weights (ThreadBlocks for
    one row, oneDNN's for three)."""
    threads(2)
    monkeypatch.setattr(cpu_step, "MIN_PACKED_WEIGHTS", 0)
    codes, clip_embedding = random_inputs(batch_size)
    drop_condition = torch.arange(batch_size) == 1
    full = model(codes, Condition(clip_embedding, drop=drop_condition))  # (B, T, vocab)
    step = model.step
    if one_code_step:
        fast_step = OneCodeStep(model, batch_size)
        assert isinstance(
            fast_step.blocks[0].qkv, ThreadBlocks if batch_size == 1 else OneDNNPacked
        )
        step = lambda codes, cache: fast_step(codes[:, 0], cache)  # noqa: E731
    cache = model.new_cache(batch_size)
    logits = model.prefill(Condition(clip_embedding, drop=drop_condition), cache)
    torch.testing.assert_close(logits, full[:, 0], atol=1e-5, rtol=1e-5)
    for t in range(NUM_CODES - 1):
        logits = step(codes[:, t : t + 1], cache)
        torch.testing.assert_close(logits, full[:, t + 1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache"):
        step(codes[:, :1], cache)
    assert cache.length == cache.max_len


@torch.no_grad()
def test_prefill_with_codes_and_chunked_steps_match_the_full_pass(model):
    codes, clip_embedding = random_inputs(batch_size=2)
    full = model(codes, clip_embedding)
    cache = model.new_cache(batch_size=2)
    logits = model.prefill(clip_embedding, cache, codes=codes[:, :5])
    torch.testing.assert_close(logits, full[:, 5], atol=1e-5, rtol=1e-5)
    logits = model.step(codes[:, 5:9], cache)  # several codes at once, after the cached ones
    torch.testing.assert_close(logits, full[:, 9], atol=1e-5, rtol=1e-5)


def test_cache_refuses_to_overflow(model):
    codes, clip_embedding = random_inputs(batch_size=1)
    cache = model.new_cache(batch_size=1)
    with torch.no_grad():
        model.prefill(clip_embedding, cache, codes=codes[:, :-1])
        with pytest.raises(ValueError, match="KV cache"):
            model.step(codes[:, -1:], cache)
        with pytest.raises(ValueError, match="empty cache"):
            model.prefill(clip_embedding, cache)


def test_kv_cache_is_preallocated_and_filled_in_place():
    cache = KVCache(num_layers=2, batch_size=3, num_heads=4, max_len=10, head_dim=8)
    storage = cache.keys_values.data_ptr()
    new = torch.randn(2, 3, 4, 2, 8)  # (keys and values, B, heads, n, head_dim)
    cache.update(0, new)
    cache.update(1, new + 1)
    cache.advance(2)
    keys, values = cache.update(0, new[:, :, :, :1] + 2)
    assert keys.shape == values.shape == (3, 4, 3, 8)
    torch.testing.assert_close(keys[:, :, :2], new[0])
    torch.testing.assert_close(values[:, :, 2:], new[1, :, :, :1] + 2)
    torch.testing.assert_close(cache.values[1, :, :, :2], new[1] + 1)
    assert cache.keys_values.data_ptr() == storage


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("layout", "in_features", "threads_or_rows", "blocks"),
    [
        (ThreadBlocks, 12, 2, 2),
        (ThreadBlocks, 12, 4, 4),
        (ThreadBlocks, 10, 4, 2),  # in_features not divisible by the threads
        (OneDNNPacked, 10, 2, None),
        (OneDNNPacked, 10, 16, None),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_weight_gives_the_plain_product_for_few_rows(
    layout, in_features, threads_or_rows, blocks, bias, threads
):
    if layout is ThreadBlocks:
        threads(threads_or_rows)
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 6, bias=bias)
    x = torch.randn(MAX_PACKED_ROWS, in_features)  # (rows, C)
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    packed = layout(linear, threads_or_rows)
    if blocks:
        assert packed.weight.shape == (blocks, in_features // blocks, 6)
    with torch.no_grad():
        linear.weight.zero_()  # the packed copy is what is read
    for rows in (1, 2, 3, MAX_PACKED_ROWS):
        torch.testing.assert_close(packed(x[:rows]), expected[:rows])


@pytest.mark.parametrize(
    ("batch_size", "cfg_scale", "layout"),
    [(1, 1.0, ThreadBlocks), (2, 1.0, OneDNNPacked), (1, 3.0, OneDNNPacked)],
)
def test_sampling_packs_its_weights_for_its_rows_and_leaves_the_model_as_it_was(
    model, batch_size, cfg_scale, layout, threads, monkeypatch
):
    monkeypatch.setattr(cpu_step, "MIN_PACKED_WEIGHTS", 0)  # the tiny preset's are smaller
    _, clip_embedding = random_inputs(batch_size)
    threads(2)
    state_before = {name: value.clone() for name, value in model.state_dict().items()}
    attributes_before = set(vars(model))
    packed_calls = []
    for kind in (ThreadBlocks, OneDNNPacked):
        multiply = kind.__call__

        def watched(self, x, multiply=multiply):
            packed_calls.append(type(self))
            return multiply(self, x)

        monkeypatch.setattr(kind, "__call__", watched)
    options = SamplingOptions(cfg_scale=cfg_scale, seed=0)
    codes = generate(model, clip_embedding, options)
    # every code after the first is a one-code step: 4 products in each of 2 layers, and the head
    assert packed_calls == [layout] * (NUM_CODES - 1) * (4 * 2 + 1)
    monkeypatch.setattr(cpu_step, "MIN_PACKED_WEIGHTS", 2**62)  # nothing packed
    assert torch.equal(generate(model, clip_embedding, options), codes)
    assert set(vars(model)) == attributes_before
    assert all(type(module) is not ThreadBlocks for module in model.modules())
    assert model.state_dict().keys() == state_before.keys()
    assert all(torch.equal(model.state_dict()[name], state_before[name]) for name in state_before)


def test_only_large_matrices_are_packed(threads):
    threads(2)
    model = GPT(tiny_config(dim=256))  # qkv, up and down reach MIN_PACKED_WEIGHTS; out and head not
    for rows, layout in ((1, ThreadBlocks), (2, OneDNNPacked)):
        step = OneCodeStep(model, rows)
        for block in step.blocks:
            packed = {
                name for name, product in block._asdict().items() if isinstance(product, layout)
            }
            assert packed == {"qkv", "up", "down"}
        assert not isinstance(step.head, layout)


def test_few_rows_product_is_the_plain_product_where_nothing_is_packed(threads):
    threads(2)
    linear = nn.Linear(8, 5)
    x = torch.randn(3, 8)
    expected = nn.functional.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(few_rows_product(linear, 3)(x), expected)  # under the size
    torch.testing.assert_close(few_rows_product(linear.double(), 3)(x.double()), expected.double())


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 1536),
        torch.randn(3, 10),
        torch.randn(1, 7),  # odd: F.gelu itself
        torch.randn(10, 4).t(),  # strided: F.gelu itself
        torch.linspace(-12, 12, 4000).view(2, -1),  # both tails
        torch.randn(4, 2048),  # more than ATEN_GELU_MAX_VALUES: F.gelu itself
    ],
)
def test_gelu_by_aten_is_the_exact_gelu(x):
    expected = nn.functional.gelu(x.double()).float()
    y = gelu_by_aten(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, nn.functional.gelu(x))


def test_packing_is_for_few_rows_in_fp32_on_a_cpu(threads):
    cpu = torch.device("cpu")
    threads(2)
    assert packing(cpu, torch.float32, 1) is ThreadBlocks
    assert packing(cpu, torch.float32, MAX_PACKED_ROWS) is OneDNNPacked
    assert packing(cpu, torch.float32, MAX_PACKED_ROWS + 1) is None
    assert packing(cpu, torch.bfloat16, 1) is None  # bf16's one-row products stay whole
    assert packing(torch.device("cuda"), torch.float32, 1) is None
    threads(1)
    assert packing(cpu, torch.float32, 1) is None


@pytest.mark.parametrize("length", [1, 7, 40])
def test_product_attention_is_sdpa_for_one_query(length):
    q = torch.randn(5, 3, 1, 8)
    keys, values = torch.randn(2, 5, 3, length, 8)
    expected = nn.functional.scaled_dot_product_attention(q, keys, values)
    torch.testing.assert_close(product_attention(q, keys, values), expected)


@pytest.mark.parametrize("attention", ["sdpa", "products"])
@torch.no_grad()
def test_either_attention_steps_as_the_full_forward_pass(model, attention, monkeypatch):
    monkeypatch.setattr(cpu_step, "one_query_attention", lambda model, rows: attention)
    codes, clip_embedding = random_inputs(4)
    full = model(codes, clip_embedding)
    step = OneCodeStep(model, 4)
    assert step.attention is cpu_step.ATTENTIONS[attention]
    cache = model.new_cache(4)
    model.prefill(clip_embedding, cache)
    for t in range(NUM_CODES - 1):
        logits = step(codes[:, t], cache)
        torch.testing.assert_close(logits, full[:, t + 1], atol=1e-5, rtol=1e-5)


def test_the_one_query_attention_is_measured_once_per_shape(model, threads, monkeypatch):
    """The faster of the two on this CPU, timed once for a shape; SDPA off fp32."""
    threads(2)
    calls = []

    def timed(attention, inputs):
        calls.append(inputs[0].shape)
        return 1.0 if attention is product_attention else 2.0

    monkeypatch.setattr(cpu_step, "_measured_attention", {})
    monkeypatch.setattr(cpu_step, "attention_seconds", timed)
    assert one_query_attention(model, 6) == "products"
    assert one_query_attention(model, 6) == "products"
    assert calls == [(6, model.config.num_heads, 1, 16)] * 2  # both timed, once
    assert one_query_attention(model.to(torch.bfloat16), 6) == "sdpa"
    assert len(calls) == 2


def test_measuring_the_attention_leaves_the_callers_draws_alone(model, monkeypatch):
    monkeypatch.setattr(cpu_step, "_measured_attention", {})
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    one_query_attention(model, 5)
    assert cpu_step._measured_attention  # it measured
    torch.testing.assert_close(torch.rand(3), expected)


def test_the_probe_attends_as_a_step_does():
    """Its keys and values are views of a KV cache, the query a view of a qkv product."""
    q, keys, values = cpu_step.step_attention_inputs(3, 2, 8, length=5, max_len=9)
    assert q.shape == (3, 2, 1, 8) and keys.shape == values.shape == (3, 2, 5, 8)
    assert not (q.is_contiguous() or keys.is_contiguous() or values.is_contiguous())
    expected = nn.functional.scaled_dot_product_attention(q, keys, values)
    torch.testing.assert_close(product_attention(q, keys, values), expected)


def test_median_seconds_leaves_out_the_warm_up_calls(monkeypatch):
    """Each call advances a fake clock by its own duration; the first two are left out."""
    clock = [0.0]
    monkeypatch.setattr(cpu_step.time, "perf_counter", lambda: clock[0])

    def taking(seconds):
        return lambda: clock.__setitem__(0, clock[0] + seconds)

    calls = [taking(s) for s in (9.0, 8.0, 1.0, 3.0, 2.0)]
    assert cpu_step.median_seconds(calls, warmup=2) == 2.0
    assert cpu_step.median_seconds(calls, warmup=0) == 3.0


def test_position_embeddings_held_for_sampling_are_those_computed(model):
    codes, _ = random_inputs(2)
    computed = model.embed_codes(codes[:, 3:9], start=3)
    positions = OneCodeStep(model, 2).positions
    torch.testing.assert_close(model.embed_codes(codes[:, 3:9], 3, positions), computed)


def test_null_embedding_is_a_trained_parameter(model):
    assert isinstance(model.conditioner.null_embedding, nn.Parameter)
    assert any(p is model.conditioner.null_embedding for p in model.parameters())
    assert model.conditioner.null_embedding.shape == (CLIP_DIM,)


def test_null_embedding_gets_gradient_only_where_the_condition_is_dropped(model):
    codes, clip_embedding = random_inputs(batch_size=2)
    model(codes, Condition(clip_embedding, drop=torch.tensor([False, False]))).sum().backward()
    assert (
        model.conditioner.null_embedding.grad is None
        or not model.conditioner.null_embedding.grad.any()
    )
    model.zero_grad()
    model(codes, Condition(clip_embedding, drop=torch.tensor([True, False]))).sum().backward()
    assert model.conditioner.null_embedding.grad.abs().sum() > 0


def test_drop_condition_replaces_the_clip_embedding(model):
    codes, clip_embedding = random_inputs(batch_size=2)
    _, other_embedding = random_inputs(batch_size=2, seed=2)
    dropped = torch.tensor([True, True])
    conditional = model(codes, clip_embedding)
    unconditional = model(codes, Condition(clip_embedding, drop=dropped))
    assert not torch.allclose(conditional, unconditional)
    # once dropped, the CLIP embedding no longer matters
    torch.testing.assert_close(
        model(codes, Condition(other_embedding, drop=dropped)), unconditional
    )
    # and only the rows that are dropped change
    mixed = model(codes, Condition(clip_embedding, drop=torch.tensor([True, False])))
    torch.testing.assert_close(mixed[0], unconditional[0])
    torch.testing.assert_close(mixed[1], conditional[1])


def test_training_drops_the_condition_with_p_uncond():
    torch.manual_seed(0)

    def drops(p_uncond: float, batch_size: int) -> torch.Tensor:
        batch = SimpleNamespace(
            text_embedding=torch.randn(batch_size, CLIP_DIM),
            image_embedding=torch.randn(batch_size, CLIP_DIM),
            has_text=torch.ones(batch_size, dtype=torch.bool),
        )
        config = tiny_config(p_uncond=p_uncond)
        return training_condition(batch, ConditionConfig("text"), config, training=True).drop

    never, always, sometimes = drops(0.0, 1000), drops(1.0, 1000), drops(0.25, 4000)
    assert never.dtype == torch.bool and not never.any() and always.all()
    assert 0.2 < sometimes.float().mean() < 0.3


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(tiny_config(num_layers=8))
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[0].attention.out.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert model.blocks[0].attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert not model.blocks[0].mlp.up.bias.any()


def test_param_groups_decay_only_linear_weights(model):
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    decayed = {id(p) for p in decay["params"]}
    undecayed = {id(p) for p in no_decay["params"]}
    assert not decayed & undecayed
    assert decayed | undecayed == {id(p) for p in model.parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    for parameter in (
        model.head.weight,
        model.blocks[0].attention.qkv.weight,
        model.conditioner.condition_mlp[0].weight,
    ):
        assert id(parameter) in decayed
    for parameter in (
        model.conditioner.null_embedding,
        model.conditioner.prefix_position,
        model.token_embedding.weight,
        model.row_embedding.weight,
        model.norm.weight,
        model.blocks[0].attention.qkv.bias,
    ):
        assert id(parameter) in undecayed


def test_model_file_imports_neither_lightning_nor_hydra():
    import generator.gpt as gpt_module

    with open(gpt_module.__file__) as source:
        tree = ast.parse(source.read())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" in imported
    assert not {name.split(".")[0] for name in imported} & {
        "lightning",
        "pytorch_lightning",
        "hydra",
    }
