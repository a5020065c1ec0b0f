"""The numbers of RUN/eval.json as the report's tables and the pipeline's headline.

Each row names where its number lives in eval.json and what its absence means: a metric that
belongs to other data (the shapes checker on a folder of photos) leaves no row, while one that
could not be measured for this data says why, instead of an empty cell, `n/a` or `nan`.
"""

from __future__ import annotations

import html
import math
from typing import Any, NamedTuple


class Metric(NamedTuple):
    label: str
    path: str  # where in eval.json, dot-separated
    unit: str = ""  # "%" (stored as a fraction), "dB", or "" for a plain number
    not_measured: str | None = None  # why a null value is missing; None: no row without a value
    headline: bool = False  # also in the pipeline's one-line summary of the evaluation


TOKENIZER = [
    Metric("PSNR", "tokenizer.psnr", "dB", headline=True),
    Metric("SSIM", "tokenizer.ssim"),
    Metric("LPIPS", "tokenizer.lpips", not_measured="LPIPS's VGG weights are not on this machine"),
    Metric("codebook usage", "tokenizer.usage", "%"),
    Metric("code perplexity", "tokenizer.perplexity"),
    Metric(
        "Fréchet distance of CLIP features, reconstructions to originals",
        "tokenizer.frechet_distance",
        not_measured="the run has no CLIP of its own (scripts/train_clip.py)",
    ),
    Metric("checker on reconstructions / originals", "tokenizer.checker_ratio", "%", None, True),
    Metric("checker ratio, seen pairs", "tokenizer.checker_ratio_by_pair.seen", "%", None, True),
    Metric("checker ratio, held-out pairs", "tokenizer.checker_ratio_by_pair.held_out", "%"),
]

CLIP = [
    Metric("image->caption top-1, seen", "clip_retrieval.seen.image_to_text_top1", "%", None, True),
    Metric("image->caption top-1, held-out", "clip_retrieval.held_out.image_to_text_top1", "%"),
    Metric(
        "image->caption top-1, held-out among held-out captions",
        "clip_retrieval.held_out_among_held_out",
        "%",
        headline=True,
    ),
    Metric(
        "image->caption top-1 within batches of the split",
        "clip_in_batch_retrieval.image_to_text_top1",
        "%",
        headline=True,
    ),
    Metric(
        "caption->image top-1 within batches", "clip_in_batch_retrieval.text_to_image_top1", "%"
    ),
    Metric("batch size of the within-batch retrieval", "clip_in_batch_retrieval.batch_size"),
    *(
        Metric(f"{swap} swap probe", f"clip_swap_probe.{swap}.percent_right")
        for swap in ("color", "shape", "size", "relation")
    ),
]


def _generation(key: str) -> list[Metric]:
    where = f"generator.{key}"
    groups = (("one object", "seen"), ("held-out pairs", "held_out"), ("two objects", "two_object"))
    return [
        Metric(
            "CLIP score of samples (cosine to their prompts)",
            f"{where}.clip_score",
            headline=key == "with_cfg",
        ),
        Metric(
            "Fréchet distance of samples' CLIP features to the split's images",
            f"{where}.frechet_distance",
            not_measured="fewer than two samples",
        ),
        *(
            Metric(
                f"caption accuracy, {name}",
                f"{where}.caption_accuracy.{group}.accuracy",
                "%",
                headline=key == "with_cfg",
            )
            for name, group in groups
        ),
    ]


VARIATIONS = [
    Metric("CLIP similarity to the source", "generator.variations.clip_similarity", headline=True),
    Metric("diversity (1 - mean CLIP cosine between variations)", "generator.variations.diversity"),
    Metric(
        "consistency (shape and colour kept)", "generator.variations.consistency", "%", None, True
    ),
    Metric(
        "consistency, seen-pair sources", "generator.variations.consistency_by_source.seen", "%"
    ),
    Metric(
        "consistency, held-out sources", "generator.variations.consistency_by_source.held_out", "%"
    ),
]


def lookup(results: dict[str, Any], path: str) -> Any:
    """The value at a dot-separated path of nested dicts, or None where there is none."""
    for key in path.split("."):
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def has(results: dict[str, Any], path: str) -> bool:
    """Whether eval.json holds this key at all (its value may be null)."""
    parent, _, key = path.rpartition(".")
    holder = lookup(results, parent) if parent else results
    return isinstance(holder, dict) and key in holder


def format_value(value: Any, unit: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape(str(value))
    if isinstance(value, float) and not math.isfinite(value):
        return "not measured"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if unit == "dB":
        return f"{value:.2f} dB"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows(results: dict[str, Any], metrics: list[Metric]) -> dict[str, str]:
    """label -> formatted value for every metric eval.json holds (or says why not)."""
    found = {}
    for metric in metrics:
        value = lookup(results, metric.path)
        if value is not None:
            found[metric.label] = format_value(value, metric.unit)
        elif metric.not_measured is not None and has(results, metric.path):
            found[metric.label] = f"not measured: {metric.not_measured}"
    return found


def sections(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """title -> rows, for the parts of the evaluation the run has."""
    split = results.get("split", "test")
    count = lookup(results, "tokenizer.num_images")
    tables = {f"Tokenizer ({count} {split} images)": rows(results, TOKENIZER)}
    tables["CLIP"] = rows(results, CLIP)
    for key, name in (("with_cfg", "with guidance"), ("without_cfg", "without guidance")):
        scale = lookup(results, f"generator.{key}.cfg_scale")
        if scale is not None:
            tables[f"Text to image, {name} (cfg_scale {scale:g})"] = rows(results, _generation(key))
    tables["Variations"] = rows(results, VARIATIONS)
    return {title: table for title, table in tables.items() if table}


def headline_numbers(results: dict[str, Any]) -> dict[str, str]:
    """The evaluation's headline numbers by label; those eval.json lacks are left out."""
    metrics = [*TOKENIZER, *CLIP, *_generation("with_cfg"), *VARIATIONS]
    return rows(results, [metric for metric in metrics if metric.headline])
