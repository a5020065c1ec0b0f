"""RUN/report.html: one self-contained page that shows what a run directory can do.

Sections: the evaluation numbers (RUN/eval.json) as tables (generator/report_tables.py),
originals beside their reconstructions, text-to-image samples under their prompts (with the
shapes checker's verdict on each, for shapes data), variations beside their sources, and the
training curves of every stage as inline SVG plots. Images are embedded as PNG data, so the
file can be mailed or copied alone. A stage the run has not reached yet gets a line saying
which script makes it, instead of its section.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from generator.images import PromptedImages, read_prompted_images, to_uint8
from generator.pipeline import DEFAULT_OPTIONS, Pipeline
from generator.report_tables import format_value, sections
from generator.sampling import SamplingOptions
from tokenizer.base.files import atomic_write_text
from tokenizer.base.run_dir import RunDir, weights_file
from tokenizer.shapes import check, parse_caption, scene_matches
from tokenizer.vqgan import VQGAN

CURVE_STAGES = ("tokenizer", "clip", "generator")
MAX_CURVES = 6  # per stage
DISPLAY_SIZE = 96  # px on the page; small images are scaled up without smoothing

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; font-weight: 600; }
td.value { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin: 6px 0 14px; }
figure { margin: 0; text-align: center; font-size: 12px; }
img { image-rendering: pixelated; border: 1px solid #ccc; }
.ok { color: #1a7f37; } .bad { color: #c62828; } .missing { color: #888; font-style: italic; }
.source img { border: 2px solid #333; }
svg { background: #fafafa; border: 1px solid #ddd; margin: 4px; }
"""


# ---------------------------------------------------------------------------------------------
# Small HTML pieces


def image_tag(image: torch.Tensor, caption: str = "", css_class: str = "") -> str:
    """A (3, H, W) image in [0, 1] as an inline PNG, with an optional caption below."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    label = f"<figcaption>{caption}</figcaption>" if caption else ""
    return (
        f'<figure class="{css_class}"><img src="data:image/png;base64,{data}" '
        f'width="{DISPLAY_SIZE}" height="{DISPLAY_SIZE}">{label}</figure>'
    )


def missing(what: str, script: str) -> str:
    return f'<p class="missing">No {what} in this run yet: run scripts/{script}.py.</p>'


def flatten(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    found: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            found.update(flatten(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


# ---------------------------------------------------------------------------------------------
# Sections


def read_results(run: RunDir) -> dict[str, Any] | None:
    path = run.eval_file
    return json.loads(path.read_text()) if path.is_file() else None


def table_rows(values: dict[str, Any], name_cell: str) -> str:
    """One row a value: its name in a `name_cell` ("th" or "td"), then the value as given."""
    return "".join(
        f"<tr><{name_cell}>{html.escape(name)}</{name_cell}><td class='value'>{value}</td></tr>"
        for name, value in values.items()
    )


def evaluation_section(results: dict[str, Any] | None) -> str:
    """One table per part of the evaluation, every number eval.json holds for this data."""
    if results is None:
        return missing("evaluation", "evaluate")
    tables = [
        f"<h3>{html.escape(title)}</h3><table>{table_rows(values, 'th')}</table>"
        for title, values in sections(results).items()
    ]
    return "".join(tables)


def all_numbers_section(results: dict[str, Any] | None) -> str:
    if results is None:
        return missing("evaluation", "evaluate")
    numbers = {key: format_value(value) for key, value in flatten(results).items()}
    cells = table_rows(numbers, "td")
    return (
        "<details><summary>every number in eval.json</summary>"
        f"<table><tr><th>metric</th><th>value</th></tr>{cells}</table></details>"
    )


@torch.inference_mode()
def reconstructions_section(vqgan: VQGAN, originals: torch.Tensor) -> str:
    """Originals (B, 3, H, W) in [-1, 1], each above its reconstruction."""
    device = next(vqgan.parameters()).device
    reconstructions = vqgan.decode(vqgan.encode(originals.to(device))).clamp(-1, 1).cpu()
    pairs = [
        f"<div>{image_tag((original + 1) / 2, 'original')}"
        f"{image_tag((reconstruction + 1) / 2, 'reconstruction')}</div>"
        for original, reconstruction in zip(originals, reconstructions, strict=True)
    ]
    return f'<div class="row">{"".join(pairs)}</div>'


def verdict(image: torch.Tensor, prompt: str) -> str:
    """The shapes checker's verdict on an image in [0, 1] for a prompt, as HTML; "" where the
    prompt is not a shapes caption."""
    try:
        query = parse_caption(prompt)
    except ValueError:
        return ""
    if scene_matches(check(image * 2 - 1), query):
        return '<span class="ok">&#10003; matches</span>'
    return '<span class="bad">&#10007; does not match</span>'


def text_to_image_section(samples: PromptedImages, use_checker: bool = True) -> str:
    rows = []
    per_prompt = samples.per_prompt
    for index, prompt in enumerate(samples.prompts):
        images = samples.images[index * per_prompt : (index + 1) * per_prompt]
        figures = "".join(
            image_tag(image, verdict(image, prompt) if use_checker else "") for image in images
        )
        rows.append(f"<h3>{html.escape(prompt)}</h3><div class='row'>{figures}</div>")
    return "".join(rows)


def variations_section(
    pipeline: Pipeline, sources: torch.Tensor, num_images: int, options: SamplingOptions
) -> str:
    varied = pipeline.variations(sources, num_images, options)
    rows = []
    for index, source in enumerate(varied.sources):
        images = varied.images[varied.source_index == index]
        figures = "".join(image_tag(image) for image in images)
        rows.append(f"<div class='row'>{image_tag(source, 'source', 'source')}{figures}</div>")
    return "".join(rows)


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, value) points of every loss-like column of a Lightning metrics.csv."""
    curves: dict[str, list[tuple[float, float]]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            for key, value in row.items():
                if "loss" in key and value and row.get("step"):
                    curves.setdefault(key, []).append((float(row["step"]), float(value)))
    return dict(list(curves.items())[:MAX_CURVES])


def svg_plot(title: str, points: list[tuple[float, float]], width=320, height=180) -> str:
    """A line plot of (x, y) points as inline SVG, with its y range and last value."""
    xs, ys = zip(*points, strict=True)
    finite = [y for y in ys if math.isfinite(y)] or [0.0]
    low, high = min(finite), max(finite)
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (high - low) or 1.0
    pad = 28

    def position(x: float, y: float) -> str:
        y = min(max(y, low), high) if math.isfinite(y) else high
        px = pad + (x - min(xs)) / span_x * (width - 2 * pad)
        py = height - pad - (y - low) / span_y * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    line = " ".join(position(x, y) for x, y in points)
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{pad}" y="16" font-size="12">{html.escape(title)} '
        f"(last {format_value(ys[-1])})</text>"
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{line}"/>'
        f'<text x="2" y="{pad + 4}" font-size="10">{format_value(high)}</text>'
        f'<text x="2" y="{height - pad}" font-size="10">{format_value(low)}</text>'
        f'<text x="{width - pad - 30}" y="{height - 8}" font-size="10">step {int(max(xs))}</text>'
        "</svg>"
    )


def curves_section(run: RunDir) -> str:
    parts = []
    for stage in CURVE_STAGES:
        path = run.logs(stage) / "metrics.csv"
        if not path.is_file():
            continue
        plots = "".join(svg_plot(name, points) for name, points in read_curves(path).items())
        parts.append(f"<h3>{stage}</h3><div class='row'>{plots}</div>")
    return "".join(parts) or missing("training logs", "train_tokenizer")


# ---------------------------------------------------------------------------------------------
# The page


def write_report(
    run_dir: str | Path,
    test_images: torch.Tensor,
    prompts: Sequence[str],
    num_images: int = 8,
    num_sources: int = 4,
    options: SamplingOptions = DEFAULT_OPTIONS,
    device: str | torch.device = "cpu",
    use_checker: bool = True,
    samples_from: str | Path | None = None,
    variation_options: SamplingOptions | None = None,
) -> Path:
    """Write RUN/report.html from what the run directory holds; `test_images` (B, 3, H, W) in
    [-1, 1] are the originals to reconstruct, the first `num_sources` also varied, both sampled
    with `options`. `use_checker` puts the shapes checker's verdict under each sample (shapes
    data only). With `samples_from`, a folder scripts/sample.py wrote, its samples are shown
    under their prompts instead of sampling `prompts`. Variations are sampled with
    `variation_options` where given."""
    run_dir, run = Path(run_dir), RunDir(run_dir)
    results = read_results(run)
    parts = [("Evaluation", evaluation_section(results))]
    if weights_file(run.tokenizer).is_file():
        vqgan = VQGAN.from_pretrained(run.tokenizer, device=device).eval()
        parts.append(("Originals and reconstructions", reconstructions_section(vqgan, test_images)))
    else:
        parts.append(("Originals and reconstructions", missing("tokenizer", "train_tokenizer")))
    if weights_file(run.generator).is_file():
        pipeline = Pipeline.from_run_dir(run_dir, device=device)
        if samples_from is not None:
            samples = read_prompted_images(samples_from)
        else:
            generated = pipeline.text_to_image(list(prompts), num_images, options)
            samples = PromptedImages(list(prompts), generated.images, num_images)
        parts.append(("Text to image", text_to_image_section(samples, use_checker)))
        sources = test_images[:num_sources]
        varied = variations_section(pipeline, sources, num_images, variation_options or options)
        parts.append(("Variations", varied))
    else:
        for title in ("Text to image", "Variations"):
            parts.append((title, missing("generator", "train_generator")))
    parts.append(("Training curves", curves_section(run)))
    parts.append(("All evaluation numbers", all_numbers_section(results)))
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in parts)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Run report: {html.escape(run_dir.name)}"
        f"</title><style>{STYLE}</style></head><body><h1>Run report</h1>"
        f"<p>{html.escape(str(run_dir.resolve()))}</p>{body}</body></html>\n"
    )
    return atomic_write_text(run.report_file, page)
