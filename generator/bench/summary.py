"""The benchmark's results as markdown tables, printed before the JSON: the machine's ceilings,
the tokenizer, the encode pipeline, sampling (and on a GPU its CUDA graph step), the fusions,
and the acceptance bars."""

from __future__ import annotations

from typing import Any

CODEC_KEYS = (  # the tokenizer table's images/s columns
    "encode_contiguous",
    "encode_channels_last",
    "decode_contiguous",
    "decode_channels_last",
    "train_step",
)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def median_of(entry: dict[str, Any], key: str) -> float | None:
    return None if "skipped" in entry else entry[key]["median"]


def table(header: str, alignment: str, rows: list[str]) -> list[str]:
    """A markdown table's lines, after a blank line."""
    return ["", header, alignment, *rows]


def machine_table(machine: dict[str, Any]) -> list[str]:
    row = (
        f"| {fmt(machine['matmul_float32']['gflops']['median'])} "
        f"| {fmt(machine['matmul_bfloat16']['gflops']['median'])} "
        f"| {fmt(machine['copy']['gbps']['median'])} |"
    )
    return [
        f"Machine: {machine['name']} ({machine['device']}, {machine['threads']} threads, "
        f"{machine['cpu_capability']}), torch {machine['torch']}",
        *table(
            "| fp32 matmul GFLOP/s | bf16 matmul GFLOP/s | copy GB/s (read + write) |",
            "|---:|---:|---:|",
            [row],
        ),
    ]


def tokenizer_row(name: str, figures: dict[str, Any]) -> str:
    cells = [median_of(figures[key], "images_per_s") for key in CODEC_KEYS]
    share = 100 * figures["train_step"]["fraction_of_matmul_ceiling"]
    return (
        f"| {name} | {figures['batch_size']} | "
        + " | ".join(fmt(c, 2) for c in cells)
        + f" | {fmt(share)} |"
    )


def tokenizer_table(tokenizers: dict[str, Any]) -> list[str]:
    return table(
        "| tokenizer | batch | encode img/s | encode (channels-last) | decode img/s "
        "| decode (channels-last) | train step img/s | train % of matmul peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        [tokenizer_row(name, figures) for name, figures in tokenizers.items()],
    )


def encode_table(pipelines: dict[str, Any]) -> list[str]:
    rows = [
        f"| {name} ({e['tokenizer']} + {e['clip']}) | {e['batch_size']} "
        f"| {fmt(e['images_per_s']['median'], 2)} |"
        for name, e in pipelines.items()
    ]
    return table("| encode.py pipeline | batch | images/s |", "|---|---:|---:|", rows)


def sampling_row(name: str, key: str, case: dict[str, Any]) -> str:
    cached = case["cached"]
    return (
        f"| {name} | {key} | {fmt(median_of(cached, 'tokens_per_s'))} "
        f"| {fmt(median_of(case['naive'], 'tokens_per_s'))} "
        f"| {fmt(case['cached_over_naive'], 2)} "
        f"| {fmt(median_of(case['cached_bf16'], 'tokens_per_s'))} "
        f"| {fmt(case['bf16_cached_over_naive'], 2)} "
        f"| {fmt(100 * cached['fraction_of_matmul_ceiling'])} "
        f"| {fmt(cached['weight_read_gbps'])} "
        f"({fmt(100 * cached['weight_read_fraction_of_copy_bandwidth'], 0)}%) |"
    )


def sampling_table(sampling: dict[str, Any]) -> list[str]:
    return table(
        "| generator | case | cached tok/s | naive tok/s | cached/naive | bf16 cached tok/s "
        "| bf16 cached/naive | cached % of matmul peak | cached weights GB/s (% of copy) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        [
            sampling_row(name, key, case)
            for name, generator in sampling.items()
            for key, case in generator["cases"].items()
        ],
    )


def graph_row(name: str, key: str, case: dict[str, Any]) -> str:
    bf16_graph = case["cached_bf16_graph"]
    share = None if "skipped" in bf16_graph else 100 * bf16_graph["fraction_of_matmul_ceiling"]
    cells = [
        median_of(case[loop], "tokens_per_s")
        for loop in ("cached", "cached_graph", "cached_bf16", "cached_bf16_graph")
    ]
    return (
        f"| {name} | {key} | {fmt(cells[0])} | {fmt(cells[1])} "
        f"| {fmt(case['graph_over_eager'], 2)} | {fmt(cells[2])} | {fmt(cells[3])} "
        f"| {fmt(case['bf16_graph_over_eager'], 2)} | {fmt(share)} |"
    )


def graph_table(sampling: dict[str, Any]) -> list[str]:
    """The cached step eager and as a replayed CUDA graph, where the run measured both."""
    rows = [
        graph_row(name, key, case)
        for name, generator in sampling.items()
        for key, case in generator["cases"].items()
        if "cached_graph" in case
    ]
    if not rows:
        return []
    return table(
        "| generator | case | fp32 eager tok/s | fp32 graph tok/s | graph/eager "
        "| bf16 eager tok/s | bf16 graph tok/s | bf16 graph/eager | bf16 graph % of bf16 peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        rows,
    )


def fusion_row(name: str, fusion: str, figures: dict[str, Any]) -> str:
    cells = [
        f"{fmt(median_of(case['cached'], 'tokens_per_s'))} ({fmt(case['over_pooled'], 2)}x)"
        for case in figures["cases"].values()
    ]
    step = figures.get("train_step")
    cells.append(
        f"{fmt(median_of(step, 'images_per_s'))} ({fmt(figures['train_step_over_pooled'], 2)}x)"
        if step
        else "-"
    )
    return (
        f"| {name} | {fusion} | {figures['params']:,} | {figures['prefix_length']} | "
        + " | ".join(cells)
        + " |"
    )


def fusion_table(fusion: dict[str, Any]) -> list[str]:
    """Cached tok/s of each fusion and, in brackets, over the pooled prefix's."""
    generators = [entry for entry in fusion.values() if entry]
    if not generators:
        return []
    cases = list(next(iter(generators[0].values()))["cases"])
    return table(
        "| generator | fusion | parameters | prefix tokens | "
        + " | ".join(f"{case} tok/s (over pooled)" for case in cases)
        + " | training step img/s (over pooled) |",
        "|---|---|---:|---:|" + "---:|" * (len(cases) + 1),
        [
            fusion_row(name, fusion_name, figures)
            for name, per_fusion in fusion.items()
            for fusion_name, figures in per_fusion.items()
        ],
    )


def bars_table(bars: dict[str, Any]) -> list[str]:
    rows = []
    for name, entry in bars.items():
        met = {True: "yes", False: "no", None: "not measured"}[entry["met"]]
        rows.append(f"| {name} | {entry['threshold']:g} | {fmt(entry['measured'], 2)} | {met} |")
    return table("| bar | threshold | measured | met |", "|---|---:|---:|---|", rows)


def summary(results: dict[str, Any]) -> str:
    lines = machine_table(results["machine"])
    if results.get("tokenizer"):
        lines += tokenizer_table(results["tokenizer"])
    if results.get("encode"):
        lines += encode_table(results["encode"])
    if results.get("sampling"):
        lines += sampling_table(results["sampling"])
        lines += graph_table(results["sampling"])
    if results.get("fusion"):
        lines += fusion_table(results["fusion"])
    lines += bars_table(results["bars"])
    return "\n".join(lines)
