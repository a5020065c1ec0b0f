"""What the web app (scripts/app.py) does with a request, without the web: reading the values a
page sends, generating one request at a time, progress and stop.

Every value a user can get wrong is refused with a ValueError whose sentence the page shows:
an empty or overlong prompt, a file that is not an image, a decompression bomb, an image too
small to read, a number out of range. A blank seed is drawn here, so that every image is
labelled with the seed and settings that make it again, and with the command of
scripts/sample.py or scripts/variations.py that does.
"""

from __future__ import annotations

import math
import secrets
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from generator.images import to_uint8
from generator.pipeline import Pipeline, clean_prompt
from generator.sampling import SamplingOptions
from tokenizer.data import load_rgb
from tokenizer.evaluation import to_unit_range
from tokenizer.shapes import check, parse_caption, scene_matches

MAX_SEED = 2**32 - 1
Progress = Callable[[int, int], None]  # (codes sampled, codes to sample)


class Limits(NamedTuple):
    """What one request may ask for (conf/app.yaml)."""

    max_images: int
    max_rerank: int
    max_prompt_chars: int
    max_pixels: int
    min_side: int


class Settings(NamedTuple):
    """The sampling boxes both tabs share, as the page sends them: None for an empty box."""

    num_images: float | None
    cfg_scale: float | None
    temperature: float | None
    top_k: float | None  # 0: off
    top_p: float | None  # 1: off
    seed: float | None  # blank: a new one
    rerank: float | None


class Result(NamedTuple):
    """What a generation shows: the gallery, a note under it, the command that repeats it."""

    gallery: list[tuple[Image.Image, str]]  # each image at its real size, with its label
    note: str
    command: str


class GenerationStopped(Exception):
    """Raised inside the sampling loop when the page's Stop was pressed."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"Stopped after {done} of {total} codes: no images were kept.")


class StopRequests:
    """The browser sessions whose running generation stops at its next code."""

    def __init__(self) -> None:
        self.sessions: set[str | None] = set()
        self.lock = threading.Lock()

    def ask(self, session: str | None) -> None:
        with self.lock:
            self.sessions.add(session)

    def clear(self, session: str | None) -> None:
        with self.lock:
            self.sessions.discard(session)

    def asked(self, session: str | None) -> bool:
        with self.lock:
            return session in self.sessions


def whole(value: float | None, name: str, least: int, most: int) -> int:
    """A whole number from a box, or a ValueError that names the box and its range."""
    is_whole = isinstance(value, int | float) and math.isfinite(value) and value == int(value)
    if not (is_whole and least <= value <= most):
        raise ValueError(f"{name} must be a whole number from {least} to {most}, got {value}.")
    return int(value)


def given(value: float | None, name: str) -> float:
    if value is None:
        raise ValueError(f"{name} is empty: enter a number.")
    return float(value)


def picture(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] as a PIL image at its real size."""
    return Image.fromarray(to_uint8(image))


def verdict(image: torch.Tensor, prompt: str) -> str:
    """The shapes checker's verdict on an image in [0, 1]; "" for a prompt it cannot read."""
    try:
        query = parse_caption(prompt)
    except ValueError:
        return ""
    return "✓ matches" if scene_matches(check(image * 2 - 1), query) else "✗ does not match"


def settings_label(options: SamplingOptions, num_images: int) -> str:
    top_k, top_p = options.top_k or "off", options.top_p or "off"
    return (
        f"seed {options.seed} · {num_images} images · cfg {options.cfg_scale:g} · "
        f"temperature {options.temperature:g} · top-k {top_k} · top-p {top_p} · "
        f"rerank {options.rerank}"
    )


def command_line(script: str, run_dir: str, options: SamplingOptions, **values: Any) -> str:
    """The shell command of scripts/<script> that makes the same images again."""
    settings = {
        **values,
        "seed": options.seed,
        "cfg_scale": options.cfg_scale,
        "temperature": options.temperature,
        "top_k": options.top_k,
        "top_p": options.top_p,
        "rerank": options.rerank,
    }
    words = [f"{key}={'null' if value is None else value}" for key, value in settings.items()]
    return shlex.join(["python", f"scripts/{script}", f"run_dir={run_dir}", *words])


class AppRequests:
    """The app's requests over one loaded pipeline; one generation runs at a time."""

    def __init__(self, pipeline: Pipeline, limits: Limits, run_dir: str) -> None:
        self.pipeline = pipeline
        self.limits = limits
        self.run_dir = run_dir
        self.stops = StopRequests()
        self.generating = threading.Lock()

    # -----------------------------------------------------------------------------------------
    # Reading what the page sends

    def count(self, settings: Settings) -> int:
        return whole(settings.num_images, "The number of images", 1, self.limits.max_images)

    def options(self, settings: Settings) -> SamplingOptions:
        """Sampling options from the boxes: top-k 0 and top-p 1 are off, a blank seed drawn."""
        vocab_size = self.pipeline.model.config.vocab_size
        top_k = whole(settings.top_k or 0, "Top-k (0: off)", 0, vocab_size)
        seed = settings.seed
        options = SamplingOptions(
            temperature=given(settings.temperature, "Temperature"),
            top_k=top_k or None,
            top_p=None if settings.top_p in (None, 1) else float(settings.top_p),
            cfg_scale=given(settings.cfg_scale, "CFG scale"),
            seed=secrets.randbelow(MAX_SEED + 1)
            if seed is None
            else whole(seed, "Seed", 0, MAX_SEED),
            rerank=whole(settings.rerank, "Reranking", 0, self.limits.max_rerank),
        )
        options.check(vocab_size)
        return options

    def prompt(self, text: str | None) -> str:
        """The prompt as CLIP will read it; refused when empty, too long or cut by CLIP."""
        text = text or ""
        if len(text) > self.limits.max_prompt_chars:
            raise ValueError(
                f"The prompt is {len(text):,} characters long; this app takes at most "
                f"{self.limits.max_prompt_chars:,}. Describe the image in a sentence."
            )
        if not clean_prompt(text):
            raise ValueError("The prompt is empty: describe the image, e.g. 'a small red circle'.")
        prepared = self.pipeline.prepare_prompts(text)[0]
        if prepared != clean_prompt(text):
            raise ValueError(
                f"The prompt is longer than this model's CLIP reads: it would be cut to "
                f"{prepared!r}. Shorten it to keep every word."
            )
        return prepared

    def source(self, path: str | None) -> Image.Image:
        """An uploaded file as an RGB image, or a ValueError that says what is wrong with it."""
        if not path:
            raise ValueError("No image given: drop a PNG, JPEG or WebP file on the image box.")
        name, limit = Path(path).name, self.limits.max_pixels
        try:
            image = load_rgb(path, limit)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(
                f"{name} has more than {limit:,} pixels, the most this app opens (a guard "
                "against decompression bombs): drop a smaller image."
            ) from None
        except Exception as error:  # whatever Pillow fails with on a file it cannot decode
            raise ValueError(
                f"{name} is not an image this app can read ({type(error).__name__}): drop a "
                "PNG, JPEG or WebP file."
            ) from None
        if min(image.size) < self.limits.min_side:
            raise ValueError(
                f"{name} is {image.width}x{image.height} px: its shorter side must be at least "
                f"{self.limits.min_side} px."
            )
        return image

    # -----------------------------------------------------------------------------------------
    # Generating

    def text_to_image(
        self,
        prompt: str | None,
        settings: Settings,
        with_verdicts: bool,
        session: str | None = None,
        progress: Progress | None = None,
    ) -> Result:
        num_images, options = self.count(settings), self.options(settings)
        prompt = self.prompt(prompt)

        def work(on_step: Progress) -> Result:
            generated = self.pipeline.text_to_image(prompt, num_images, options, on_step=on_step)
            label = settings_label(options, num_images)
            gallery = []
            for number, image in enumerate(generated.images, start=1):
                checked = verdict(image, prompt) if with_verdicts else ""
                caption = " · ".join(filter(None, [checked, f"image {number}", label]))
                gallery.append((picture(image), caption))
            command = command_line(
                "sample.py", self.run_dir, options, prompt=prompt, num_images=num_images
            )
            return Result(gallery, f"{num_images} images for {prompt!r}", command)

        return self.run(work, session, progress)

    def variations(
        self,
        path: str | None,
        settings: Settings,
        keep_rows: float | None,
        session: str | None = None,
        progress: Progress | None = None,
    ) -> Result:
        num_images, options = self.count(settings), self.options(settings)
        height = self.pipeline.vqgan.config.grid_size[0]
        keep_rows = whole(keep_rows, "Rows to keep", 0, height)
        image, name = self.source(path), Path(path).name

        def work(on_step: Progress) -> Result:
            varied = self.pipeline.variations(
                image, num_images, options, keep_rows=keep_rows, on_step=on_step
            )
            label = f"keep_rows {keep_rows} · {settings_label(options, num_images)}"
            gallery = [
                (picture(each), f"variation {number} · {label}")
                for number, each in enumerate(varied.images, start=1)
            ]
            command = command_line(
                "variations.py",
                self.run_dir,
                options,
                image=name,
                num_images=num_images,
                keep_rows=keep_rows,
            )
            return Result(gallery, f"{num_images} variations of {name}", command)

        return self.run(work, session, progress)

    def preview(self, path: str | None) -> Image.Image | None:
        """The dropped image as the tokenizer reads it (cropped and resized); None when cleared."""
        if not path:
            return None
        sources = self.pipeline.prepare_images(self.source(path))
        return picture(to_unit_range(sources[0]))

    def stop(self, session: str | None) -> None:
        self.stops.ask(session)

    def run(
        self, work: Callable[[Progress], Result], session: str | None, progress: Progress | None
    ) -> Result:
        """`work` alone on the model, stopped at the next code once the session asks; a stop
        asked before it started is forgotten."""

        def on_step(done: int, total: int) -> None:
            if self.stops.asked(session):
                raise GenerationStopped(done, total)
            if progress is not None:
                progress(done, total)

        with self.generating:
            self.stops.clear(session)
            started = time.perf_counter()
            try:
                result = work(on_step)
            except GenerationStopped as stopped:
                return Result([], str(stopped), "")
        seconds = time.perf_counter() - started
        return result._replace(note=f"{result.note} in {seconds:.1f} s.")
