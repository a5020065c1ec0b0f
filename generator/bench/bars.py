"""The issue's acceptance bars: each compares one measured figure with its threshold (met where
the figure reaches it). conf/bench.yaml's `bars` holds each bar's requirement and threshold;
which figure of the results a bar reads is here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from omegaconf import DictConfig


class Figure(NamedTuple):
    """What a bar measures: a reader of the results, and what the run must measure for it."""

    read: Callable[[dict[str, Any]], float | None]
    where: str


def case_value(sampling: dict, name: str, case: str, *keys: str) -> float | None:
    value: Any = sampling.get(name, {}).get("cases", {}).get(case)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def best_cached(
    sampling: dict,
    name: str,
    case: str,
    key: str,
    loops: tuple[str, ...] = ("cached", "cached_bf16"),
) -> float | None:
    """The higher `key` of the cached `loops` measured in a case (by default fp32, and bf16
    where measured); each fraction is against the ceiling of the dtype it runs in and the
    bytes its weights take."""
    entry = sampling.get(name, {}).get("cases", {}).get(case)
    if entry is None:
        return None
    measured = [entry[k][key] for k in loops if k in entry and "skipped" not in entry[k]]
    return max(measured, default=None)


def slowest_channels_last_encode(results: dict[str, Any]) -> float | None:
    tokenizers = results.get("tokenizer", {})
    ratios = [t["encode_channels_last_over_contiguous"] for t in tokenizers.values()]
    return min(ratios) if ratios else None


def fusion_over_pooled(results: dict[str, Any], name: str, fusion: str) -> float | None:
    """The lowest of a fusion's tokens/s over the pooled prefix's, across the measured cases."""
    cases = results.get("fusion", {}).get(name, {}).get(fusion, {}).get("cases", {})
    ratios = [entry["over_pooled"] for entry in cases.values()]
    return None if not ratios or None in ratios else min(ratios)


def sampling_of(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("sampling", {})


FIGURES = {
    "cached_over_naive_256_tokens": Figure(
        lambda r: case_value(sampling_of(r), "small_256", "b1", "cached_over_naive"),
        "small_256 b1 (cached and naive)",
    ),
    "cached_over_naive_64_tokens": Figure(
        lambda r: case_value(sampling_of(r), "small_64", "b1", "cached_over_naive"),
        "small_64 b1 (cached and naive)",
    ),
    "reference_batch1_weight_bandwidth": Figure(
        lambda r: best_cached(
            sampling_of(r), "reference", "b1", "weight_read_fraction_of_copy_bandwidth"
        ),
        "reference b1",
    ),
    "reference_batch16_matmul_fraction": Figure(
        lambda r: best_cached(sampling_of(r), "reference", "b16", "fraction_of_matmul_ceiling"),
        "reference b16",
    ),
    "reference_bf16_graph_batch1_tokens_per_s": Figure(
        lambda r: case_value(
            sampling_of(r), "reference", "b1", "cached_bf16_graph", "tokens_per_s", "median"
        ),
        "reference b1 bf16 graph (device=cuda)",
    ),
    "reference_bf16_graph_over_eager_batch1": Figure(
        lambda r: case_value(sampling_of(r), "reference", "b1", "bf16_graph_over_eager"),
        "reference b1 bf16 graph and eager (device=cuda)",
    ),
    "reference_batch64_cfg_bf16_matmul_fraction": Figure(
        lambda r: best_cached(
            sampling_of(r),
            "reference",
            "b64_cfg",
            "fraction_of_matmul_ceiling",
            ("cached_bf16", "cached_bf16_graph"),
        ),
        "reference b64_cfg bf16",
    ),
    "reference_early_over_pooled": Figure(
        lambda r: fusion_over_pooled(r, "reference", "early"),
        "reference, pooled and early fusion (sections=[fusion])",
    ),
    "channels_last_encode": Figure(slowest_channels_last_encode, "tokenizer encode"),
}


def check_bars(specs: DictConfig) -> None:
    """Fails before anything is measured where `bars` names a bar this module cannot read."""
    unknown = sorted(set(specs) - set(FIGURES))
    if unknown:
        raise ValueError(f"bars has {unknown}: choose from {list(FIGURES)}.")


def bar(requirement: str, threshold: float, measured: float | None, where: str) -> dict[str, Any]:
    met = None if measured is None else measured >= threshold
    entry = {"requirement": requirement, "threshold": threshold, "measured": measured, "met": met}
    if measured is None:
        entry["reason"] = f"{where} was not measured in this run"
    return entry


def bars(results: dict[str, Any], specs: DictConfig) -> dict[str, Any]:
    """Each bar of `specs` (name -> requirement and threshold) against the results."""
    judged = {}
    for name, spec in specs.items():
        figure = FIGURES[name]
        judged[name] = bar(
            str(spec.requirement), float(spec.threshold), figure.read(results), figure.where
        )
    return judged
