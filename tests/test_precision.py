"""Sampling precision (fp32, bf16, fp16, auto) and the CUDA graph step: what auto resolves to,
half-precision sampling, fp32 codes unchanged, and the graph path, eager here on a CPU and
replayed where a GPU is present."""

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import compose_config, load_script, tiny_config, unit

import generator.next_code_logits as next_code_logits
import generator.precision as precision
from generator.conditioning import Condition
from generator.cuda_graph_step import GraphCaptureWarning, PositionedStep, graph_skip_reason
from generator.gpt import GPT
from generator.next_code_logits import CachedLogits, GraphedLogits, cached_logits_class
from generator.pipeline import DEFAULT_OPTIONS, Pipeline
from generator.precision import ProbeTimes, auto_precision, check_precision, sampling_precision
from generator.sampling import SamplingOptions, generate, generate_naive
from tokenizer.base.cli import run_command

OLD_RUN = Path(__file__).parent / "data" / "run_bf7b76f"
GUIDED = SamplingOptions(cfg_scale=3.0, top_k=40, seed=7)
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def tiny_model(fusion: str = "pooled", dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(0)
    extra = {} if fusion == "pooled" else {"token_dim": 8, "num_condition_tokens": 5}
    return GPT(tiny_config(fusion=fusion, **extra)).eval().to(dtype)


def condition(model: GPT, rows: int = 3) -> Condition:
    pooled = unit(rows, model.config.clip_dim, seed=1)
    if model.config.fusion == "pooled":
        return Condition(pooled)
    tokens = torch.randn(rows, 5, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.arange(5) < torch.tensor([[5], [3], [1]])[:rows]
    return Condition(pooled, tokens, mask)


def refuse_to_probe(*args):
    raise AssertionError("auto measured where it must not")


# ---------------------------------------------------------------------------------------------
# Names and auto


@pytest.mark.parametrize("name", ["bf32", "half", "FP32", 16, None])
def test_unknown_precisions_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, fp16, auto, got"):
        check_precision(name)


def test_an_unknown_precision_is_refused_before_the_run_is_read(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        Pipeline.from_run_dir(tmp_path / "no run here", precision="bfloat16")


@pytest.mark.parametrize(
    "script, config, subject",
    [
        ("sample.py", "sample", "prompt=a red circle"),
        ("variations.py", "variations", "image=x.png"),
    ],
)
def test_a_scripts_unknown_precision_is_one_sentence(run_dir, script, config, subject):
    cfg = compose_config(config, [f"run_dir={run_dir}", "precision=half", subject])
    module = load_script(script)
    entry = module.sample if config == "sample" else module.make_variations
    with pytest.raises(
        SystemExit, match=r"^Error: precision must be one of fp32, bf16, fp16, auto"
    ):
        run_command(entry, cfg)


def test_auto_is_bf16_on_a_gpu_that_computes_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert auto_precision(CUDA, refuse_to_probe) == "bf16"


def test_auto_is_fp32_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    emulated_only = lambda including_emulation=True: including_emulation  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulated_only)
    assert auto_precision(CUDA, refuse_to_probe) == "fp32"


def test_auto_is_fp32_without_measuring_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    assert auto_precision(CPU, refuse_to_probe) == "fp32"


@pytest.mark.parametrize("faster, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_probe_on_a_cpu_with_native_bf16(monkeypatch, faster, expected):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    assert auto_precision(CPU, lambda: faster) == expected


@pytest.mark.parametrize(
    "bf16_seconds, expected",
    [({1: 1.0, 16: 2.0}, "bf16"), ({1: 1.0, 16: 4.0}, "fp32"), ({1: 3.0, 16: 2.0}, "fp32")],
)
def test_auto_on_a_cpu_wants_bf16_at_one_row_and_at_a_full_chunk(
    monkeypatch, bf16_seconds, expected
):
    """fp32 takes 2 s at either size: bf16 must be no slower at both."""
    probed = []

    def probe(linear, rows):
        probed.append(rows)
        return ProbeTimes(fp32=2.0, bf16=bf16_seconds[rows])

    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precision, "bf16_probe", probe)
    assert sampling_precision("auto", tiny_model(), precision.probe_rows(8)) == expected
    assert set(probed) <= {1, 16} and probed[0] == 1


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_a_named_precision_is_taken_as_it_is(monkeypatch, name):
    monkeypatch.setattr(precision, "bf16_probe", refuse_to_probe)
    assert sampling_precision(name, tiny_model(), (1, 16)) == name


def test_the_sampling_configs_document_precision_auto():
    for name in ("sample", "variations", "evaluate"):
        assert compose_config(name, ["run_dir=RUN"]).precision == "auto"
        text = (Path(__file__).parents[1] / "conf" / f"{name}.yaml").read_text()
        assert "fp32 | bf16 | fp16 | auto" in text


# ---------------------------------------------------------------------------------------------
# Half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", ["pooled", "deep"])
def test_half_precision_samples_codes_in_range(dtype, fusion):
    model = tiny_model(fusion, dtype)
    cond = condition(model)
    prefix = torch.randint(0, model.config.vocab_size, (3, 8))
    for options, prefix_codes in ((GUIDED, None), (SamplingOptions(seed=1), prefix)):
        codes = generate(model, cond, options, prefix_codes=prefix_codes)
        assert codes.shape == (3, model.config.num_codes) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < model.config.vocab_size
    assert torch.equal(codes[:, :8], prefix)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_its_cache_in_its_dtype_and_mixes_logits_in_fp32(dtype):
    model = tiny_model(dtype=dtype)
    with torch.inference_mode():
        source = CachedLogits(model, condition(model).to(CPU, dtype), cfg_scale=3.0)
        first = source.start()
        second = source.advance(first.argmax(dim=-1))
    assert source.cache.keys_values.dtype == dtype
    assert first.dtype == second.dtype == torch.float32
    assert first.shape == second.shape == (3, model.config.vocab_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_follow_the_fp32_models(dtype):
    """The cast keeps the model: its guided logits differ from fp32's by rounding only."""
    fp32, half = tiny_model(), tiny_model(dtype=dtype)
    with torch.inference_mode():
        wanted = CachedLogits(fp32, condition(fp32), cfg_scale=3.0).start()
        got = CachedLogits(half, condition(half).to(CPU, dtype), cfg_scale=3.0).start()
    spread = (wanted.max() - wanted.min()).item()
    assert (got - wanted).abs().max().item() < 0.05 * spread


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_pipeline_samples_in_the_precision_it_was_loaded_with(run_dir, name, dtype):
    pipeline = Pipeline.from_run_dir(run_dir, precision=name)
    assert pipeline.precision == name and pipeline.model.head.weight.dtype == dtype
    generated = pipeline.text_to_image(["a red circle"], 2, replace(DEFAULT_OPTIONS, seed=0))
    assert generated.codes.min() >= 0 and generated.codes.max() < pipeline.vqgan.num_codes
    assert generated.images.dtype == torch.float32 and torch.isfinite(generated.images).all()


def test_a_pipeline_loaded_with_auto_holds_what_auto_chose(run_dir, monkeypatch):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precision, "bf16_probe", lambda linear, rows: ProbeTimes(2.0, 1.0))
    pipeline = Pipeline.from_run_dir(run_dir, precision="auto")
    assert pipeline.precision == "bf16" and pipeline.model.head.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# fp32 as before


def test_fp32_samples_the_codes_an_old_version_sampled(tmp_path):
    run = Path(shutil.copytree(OLD_RUN, tmp_path / "run"))
    wanted = json.loads((run / "expected_codes.json").read_text())["text_to_image"]
    pipeline = Pipeline.from_run_dir(run, precision="fp32")
    options = replace(DEFAULT_OPTIONS, seed=wanted["seed"], top_k=wanted["top_k"])
    generated = pipeline.text_to_image(wanted["prompts"], wanted["num_images"], options)
    assert generated.codes.tolist() == wanted["codes"]


@pytest.mark.parametrize("fusion", ["pooled", "deep"])
def test_fp32_cached_codes_are_the_naive_loops_for_a_seed(fusion):
    model = tiny_model(fusion)
    cond = condition(model)
    eager = replace(GUIDED, cuda_graph=False)
    cached = generate(model, cond, GUIDED)
    assert torch.equal(cached, generate(model, cond, eager))
    assert torch.equal(cached, generate_naive(model, cond, GUIDED))


# ---------------------------------------------------------------------------------------------
# The CUDA graph step


def test_the_graph_step_is_skipped_with_a_reason_on_a_cpu():
    assert "cpu" in graph_skip_reason(CPU, True)
    assert graph_skip_reason(CUDA, False) == "cuda_graph=False"
    assert cached_logits_class(tiny_model(), True) is CachedLogits


def test_cuda_graph_must_be_a_boolean():
    with pytest.raises(ValueError, match="cuda_graph must be true or false"):
        SamplingOptions(cuda_graph="yes").check(64)
    cfg = compose_config("sample", ["run_dir=RUN", "cuda_graph=false"])
    assert SamplingOptions.from_settings(cfg, DEFAULT_OPTIONS).cuda_graph is False


@pytest.mark.parametrize("fusion", ["pooled", "deep"])
@torch.inference_mode()
def test_the_graph_step_computes_the_eager_steps_logits(fusion):
    """PositionedStep (what the graph records) against OneCodeStep, step by step, on a CPU."""
    model = tiny_model(fusion)
    cond = condition(model).guided()
    eager = CachedLogits(model, cond)
    positioned = CachedLogits(model, cond)
    positioned.cache.keys_values.fill_(float("nan"))  # what an allocator may leave there
    step = PositionedStep(model, positioned.cache)
    torch.testing.assert_close(positioned.start(), eager.start(), rtol=0, atol=0)
    codes = torch.randint(0, model.config.vocab_size, (6, model.config.num_codes))
    for t in range(model.config.num_codes - 1):
        step.slot.fill_(positioned.cache.length)
        logits = step(codes[:, t])
        positioned.cache.advance(1)
        torch.testing.assert_close(logits, eager.advance(codes[:, t]), rtol=1e-5, atol=1e-5)


class EagerCapture:
    """Stands in for CapturedStep on a CPU: runs the step it would record, counting captures."""

    made = 0

    def __init__(self, run, codes) -> None:
        EagerCapture.made += 1
        self.run = run

    def __call__(self, codes):
        return self.run(codes)


class FailingCapture:
    def __init__(self, run, codes) -> None:
        run(codes)  # the warm-up has written the slot when a capture fails
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.mark.parametrize("fusion", ["pooled", "deep"])
def test_graphed_logits_sample_the_eager_codes(monkeypatch, fusion):
    """GraphedLogits' own work (the slot, the cache's length, guidance inside the step) with the
    capture replaced by running the step: one capture a call, the eager codes."""
    model = tiny_model(fusion)
    cond = condition(model)
    prefix = torch.randint(0, model.config.vocab_size, (3, 8))
    wanted = generate(model, cond, GUIDED, prefix_codes=prefix)
    monkeypatch.setattr(next_code_logits, "graph_skip_reason", lambda device, wanted: None)
    monkeypatch.setattr(next_code_logits, "CapturedStep", EagerCapture)
    assert cached_logits_class(model, True) is GraphedLogits
    EagerCapture.made = 0
    assert torch.equal(generate(model, cond, GUIDED, prefix_codes=prefix), wanted)
    assert EagerCapture.made == 1


def test_a_failed_capture_warns_and_samples_eagerly(monkeypatch):
    model = tiny_model()
    cond = condition(model)
    wanted = generate(model, cond, GUIDED)
    monkeypatch.setattr(next_code_logits, "graph_skip_reason", lambda device, wanted: None)
    monkeypatch.setattr(next_code_logits, "CapturedStep", FailingCapture)
    with pytest.warns(GraphCaptureWarning, match="cuda_graph=False"):
        codes = generate(model, cond, GUIDED)
    assert torch.equal(codes, wanted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs replay on a GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", ["pooled", "deep"])
def test_graph_and_eager_give_the_same_codes_on_a_gpu(dtype, fusion):
    model = tiny_model(fusion, dtype).cuda()
    cond = condition(model).to(CUDA, dtype)
    prefix = torch.randint(0, model.config.vocab_size, (3, 8), device=CUDA)
    assert cached_logits_class(model, True) is GraphedLogits
    for options, prefix_codes in ((GUIDED, None), (SamplingOptions(seed=2), prefix)):
        eager = generate(model, cond, replace(options, cuda_graph=False), prefix_codes=prefix_codes)
        with warnings.catch_warnings():
            warnings.simplefilter("error", GraphCaptureWarning)
            graphed = generate(model, cond, options, prefix_codes=prefix_codes)
        assert torch.equal(graphed, eager)
