"""scripts/bench.py in quick mode: one JSON object printed last and written, every section filled.

No test here asserts a time: speed is read from the benchmark, never checked by the suite.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_config
from omegaconf import OmegaConf

from generator.bench import for_device, selection, size_set_name
from generator.bench.bars import FIGURES, fusion_over_pooled
from generator.bench.machine import Ceilings
from generator.bench.sampling import Sampler, graph_cases
from generator.bench.summary import fusion_table, graph_table
from generator.cuda_graph_step import GraphCaptureWarning

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("encode_contiguous", "encode_channels_last", "decode_contiguous", "decode_channels_last")
SECTION_WORDS = ("tokenizer", "encode", "sampling", "fusion")
BARS = (
    "cached_over_naive_256_tokens",
    "cached_over_naive_64_tokens",
    "reference_batch1_weight_bandwidth",
    "reference_batch16_matmul_fraction",
    "reference_bf16_graph_batch1_tokens_per_s",
    "reference_bf16_graph_over_eager_batch1",
    "reference_batch64_cfg_bf16_matmul_fraction",
    "reference_early_over_pooled",
    "channels_last_encode",
)
GRAPH_BARS = BARS[4:7]
FUSIONS = ("pooled", "early", "resampler", "deep")
CEILINGS = Ceilings(fp32_gflops=1.0, bf16_gflops=2.0, copy_gbps=3.0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, dict]:
    """(the JSON printed last, the JSON written to `out`); bf16=true runs all three samplers
    even on CPUs where bf16=auto skips the bf16 one."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "quick=true",
            "bf16=true",
            f"out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout[result.stdout.rindex("\n{") + 1 :]
    return json.loads(printed), json.loads(out.read_text()), result.stderr


def assert_spread(figures: dict) -> None:
    """A median with its min and max, all positive."""
    assert 0 < figures["min"] <= figures["median"] <= figures["max"]


def assert_measured(entry: dict, unit: str) -> None:
    assert_spread(entry[f"{unit}_per_s"])
    assert_spread(entry["seconds"])
    assert entry["repeats"] >= 1
    assert entry["gflop_per_run"] > 0 and entry["achieved_gflops"] > 0
    assert entry["fraction_of_matmul_ceiling"] > 0
    assert entry["peak_rss_mb"] > 0 and entry["peak_rss_mb"] >= entry["peak_rss_growth_mb"]


def test_the_json_printed_last_is_the_one_written(bench):
    printed, written, _ = bench
    assert printed == written
    assert set(written) == {
        "machine",
        "tokenizer",
        "encode",
        "sampling",
        "fusion",
        "bars",
        "settings",
    }


def test_each_measurement_is_a_progress_line_as_it_ends(bench):
    """A run stopped early (a time limit on a lent machine) still shows what it measured."""
    written, stderr = bench[1], bench[2]
    lines = [line for line in stderr.splitlines() if line.split(" ")[0] in SECTION_WORDS]
    tiny = written["sampling"]["tiny_64"]["cases"]["b1"]["cached"]["tokens_per_s"]["median"]
    starts = ("tokenizer tiny:", "encode tiny:", "sampling tiny_64 b", "fusion tiny_64 ")
    assert all(line.startswith(starts) for line in lines)
    # a tokenizer, a pipeline, batches 1 and 2 with and without CFG, 4 fusions at batch 1 with
    # and without CFG and their training steps
    assert len(lines) == 1 + 1 + 4 + 4 * (2 + 1)
    assert f"sampling tiny_64 b1: cached {tiny:,.1f} tokens/s" in stderr


def test_machine_ceilings_are_measured(bench):
    machine = bench[1]["machine"]
    assert_spread(machine["matmul_float32"]["gflops"])
    assert_spread(machine["matmul_bfloat16"]["gflops"])
    assert_spread(machine["copy"]["gbps"])
    assert machine["name"] and machine["device"] == "cpu"


def test_tokenizer_codec_and_training_step(bench):
    tiny = bench[1]["tokenizer"]["tiny"]
    for layout in LAYOUTS:
        assert_measured(tiny[layout], "images")
    assert tiny["encode_channels_last_over_contiguous"] > 0
    step = tiny["train_step"]
    assert_measured(step, "images")
    # one autoencoder forward per step, reused (detached) by the discriminator step:
    # the discriminator sees the reconstructions for the GAN term, then real and fake images
    assert step["module_calls_per_step"] == {"encoder": 1, "decoder": 1, "discriminator": 3}


def test_encode_pipeline_throughput(bench):
    assert_measured(bench[1]["encode"]["tiny"], "images")


def test_sampling_cases_and_ratios(bench):
    generator = bench[1]["sampling"]["tiny_64"]
    assert generator["flop_counter_over_analytic"] == pytest.approx(1.0, rel=0.02)
    assert set(generator["cases"]) == {"b1", "b1_cfg", "b2", "b2_cfg"}
    for case in generator["cases"].values():
        for implementation in ("cached", "naive", "cached_bf16"):
            assert_measured(case[implementation], "tokens")
            assert case[implementation]["weight_read_gbps"] > 0
        for key in ("cached_over_naive", "bf16_over_fp32_cached", "bf16_cached_over_naive"):
            assert case[key] > 0
    assert generator["cases"]["b1_cfg"]["rows"] == 2
    for case in generator["cases"].values():  # a CPU replays no CUDA graph
        assert not {"cached_graph", "cached_bf16_graph", "graph_over_eager"} & set(case)


def test_each_fusion_is_measured_against_the_pooled_prefix(bench):
    """Every fusion samples the quick generator, cached, with a ratio to the pooled prefix's
    tokens/s from the same run; the fusions that read token features take the bench's CLIP
    token shape (early fusion: one prefix token per CLIP token)."""
    fusions = bench[1]["fusion"]["tiny_64"]
    assert tuple(fusions) == FUSIONS
    length = OmegaConf.load(ROOT / "conf" / "bench.yaml").clip_tokens[0]
    assert fusions["early"]["prefix_length"] == fusions["pooled"]["prefix_length"] + length
    assert fusions["deep"]["params"] > fusions["pooled"]["params"]
    for figures in fusions.values():
        assert set(figures["cases"]) == {"b1", "b1_cfg"}
        for case in figures["cases"].values():
            assert_measured(case["cached"], "tokens")
    for figures in fusions.values():  # tiny_64 is in fusion_train_generators
        assert_measured(figures["train_step"], "images")
        assert figures["train_step_over_pooled"] > 0
    assert fusions["pooled"]["train_step_over_pooled"] == 1.0
    for case, entry in fusions["early"]["cases"].items():
        pooled = fusions["pooled"]["cases"][case]["cached"]["tokens_per_s"]["median"]
        early = entry["cached"]["tokens_per_s"]["median"]
        assert entry["over_pooled"] == pytest.approx(early / pooled)


def test_every_bar_is_reported(bench):
    bars = bench[1]["bars"]
    assert set(bars) == set(BARS)
    for entry in bars.values():
        assert {"requirement", "threshold", "measured", "met"} <= set(entry)
    assert bars["cached_over_naive_256_tokens"]["met"] is None  # small_256 is not in quick
    assert isinstance(bars["channels_last_encode"]["met"], bool)
    for name in GRAPH_BARS:  # a GPU's, and the reference size is not in quick
        assert bars[name]["met"] is None and "not measured" in bars[name]["reason"]


# ---------------------------------------------------------------------------------------------
# device=cuda, without a GPU: its settings, sizes, graph cases, table and bars


def test_a_gpu_run_takes_the_cuda_settings_and_the_gpu_sizes():
    cfg = compose_config("bench", [])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on_gpu = for_device(cfg, cuda)
    assert on_gpu.repeats < cfg.repeats and on_gpu.naive_max_s < cfg.naive_max_s
    assert for_device(cfg, cpu).repeats == cfg.repeats
    assert size_set_name(cfg, cuda) == "gpu" and size_set_name(cfg, cpu) == "default"
    chosen = selection(on_gpu, cuda)
    assert list(chosen.batch_sizes) == [1, 8, 64]
    assert {"small_256", "reference"} <= set(chosen.generators)
    assert size_set_name(compose_config("bench", ["sizes=all"]), cuda) == "all"


def measured(tokens_per_s: float, fraction: float) -> dict:
    return {"tokens_per_s": {"median": tokens_per_s}, "fraction_of_matmul_ceiling": fraction}


def test_graph_cases_measure_both_precisions_and_say_why_one_is_missing():
    eager = {"cached": measured(100.0, 0.1), "cached_bf16": measured(200.0, 0.2)}

    def run_graph(gpt, ceiling):
        if gpt == "bf16 model":
            raise GraphCaptureWarning("no capture here")
        return measured(400.0, 0.4)

    sampler = Sampler("fp32 model", "bf16 model", "true", 1.0)
    cases = graph_cases(eager, run_graph, sampler, CEILINGS)
    assert cases["cached_graph"]["tokens_per_s"]["median"] == 400.0
    assert cases["graph_over_eager"] == 4.0
    assert "no capture here" in cases["cached_bf16_graph"]["skipped"]
    assert cases["bf16_graph_over_eager"] is None
    skipped_eager = {**eager, "cached_bf16": {"skipped": "bf16=false"}}
    cases = graph_cases(skipped_eager, lambda gpt, ceiling: measured(1.0, 0.1), sampler, CEILINGS)
    assert cases["cached_bf16_graph"] == {"skipped": "bf16=false"}


def test_graph_rows_make_a_table_and_meet_the_gpu_bars():
    case = {
        "cached": measured(1000.0, 0.01),
        "cached_graph": measured(3000.0, 0.03),
        "cached_bf16": measured(1200.0, 0.2),
        "cached_bf16_graph": measured(3600.0, 0.35),
        "graph_over_eager": 3.0,
        "bf16_graph_over_eager": 3.0,
    }
    results = {"sampling": {"reference": {"cases": {"b1": case, "b64_cfg": case}}}}
    lines = graph_table(results["sampling"])
    assert lines[1].startswith("| generator | case | fp32 eager tok/s | fp32 graph tok/s")
    assert (
        lines[3]
        == "| reference | b1 | 1,000.0 | 3,000.0 | 3.00 | 1,200.0 | 3,600.0 | 3.00 | 35.0 |"
    )
    figures = [FIGURES[name].read(results) for name in GRAPH_BARS]
    assert figures == [3600.0, 3.0, 0.35]
    assert graph_table({"tiny_64": {"cases": {"b1": {"cached": case["cached"]}}}}) == []


def test_the_fusion_bar_reads_the_slowest_case_and_the_table_shows_each_ratio():
    def figures(tokens_per_s: dict[str, float], over_pooled: dict[str, float | None]) -> dict:
        cases = {
            case: {"cached": {"tokens_per_s": {"median": rate}}, "over_pooled": over_pooled[case]}
            for case, rate in tokens_per_s.items()
        }
        return {"params": 10, "prefix_length": 4, "cases": cases}

    pooled = figures({"b1": 100.0, "b8": 400.0}, {"b1": 1.0, "b8": 1.0})
    early = figures({"b1": 90.0, "b8": 300.0}, {"b1": 0.9, "b8": 0.75})
    results = {"fusion": {"reference": {"pooled": pooled, "early": early}}}
    assert fusion_over_pooled(results, "reference", "early") == 0.75
    assert fusion_over_pooled(results, "shapes", "early") is None  # not measured
    unmeasured = {"fusion": {"reference": {"early": figures({"b1": 90.0}, {"b1": None})}}}
    assert fusion_over_pooled(unmeasured, "reference", "early") is None
    rows = fusion_table(results["fusion"])
    assert "| reference | early | 10 | 4 | 90.0 (0.90x) | 300.0 (0.75x) | - |" in rows
