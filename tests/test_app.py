"""The web app over a tiny run: its requests in Python (generator/app_requests.py), its API
through gradio_client, its page in headless Chromium, and the command that serves it."""

import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from browser import chromium, free_port, needed
from helpers import (
    ROOT,
    compose_config,
    decompression_bomb_png,
    huge_header_png,
    image_bytes,
    load_script,
)
from PIL import Image

import generator.sampling as sampling
from generator.app_requests import AppRequests, Limits, Settings, picture
from generator.pipeline import Pipeline
from generator.sampling import SamplingOptions

LIMITS = Limits(
    max_images=16, max_rerank=16, max_prompt_chars=1000, max_pixels=1 << 24, min_side=16
)
GOOD = Settings(num_images=2, cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=0, rerank=0)
PROMPT = "a small red circle"
CODES = 64  # the tiny tokenizer's 8x8 grid


class Served(NamedTuple):
    address: str
    requests: AppRequests


@pytest.fixture(scope="module")
def pipeline(run_dir) -> Pipeline:
    return Pipeline.from_run_dir(run_dir, "cpu")


@pytest.fixture
def requests(pipeline, run_dir) -> AppRequests:
    return AppRequests(pipeline, LIMITS, str(run_dir))


def write_picture(path: Path, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
        path
    )
    return path


# ---------------------------------------------------------------------------------------------
# Requests


def test_each_image_is_labelled_with_the_seed_and_command_that_make_it_again(
    requests, pipeline, run_dir
):
    result = requests.text_to_image(PROMPT, GOOD._replace(num_images=3, seed=7), True)
    again = pipeline.text_to_image(PROMPT, 3, SamplingOptions(cfg_scale=3.0, seed=7))
    for number, (image, caption) in enumerate(result.gallery):
        assert image.size == (32, 32)
        assert np.array_equal(np.asarray(image), np.asarray(picture(again.images[number])))
        assert f"image {number + 1} · seed 7 · 3 images · cfg 3" in caption
        assert "match" in caption  # the shapes checker's verdict
    words = [load_script("sample.py").quoted_prompt(w) for w in shlex.split(result.command)]
    assert words[:2] == ["python", "scripts/sample.py"]
    cfg = compose_config("sample", words[2:])
    assert (cfg.prompt, cfg.num_images, cfg.seed, cfg.rerank) == (PROMPT, 3, 7, 0)
    assert cfg.run_dir == str(run_dir)


def test_a_blank_seed_is_drawn_and_shown(requests):
    result = requests.text_to_image(PROMPT, GOOD._replace(seed=None), False)
    seed = int(re.search(r"seed (\d+)", result.gallery[0][1]).group(1))
    again = requests.text_to_image(PROMPT, GOOD._replace(seed=seed), False)
    assert [np.asarray(a).tolist() for a, _ in result.gallery] == [
        np.asarray(b).tolist() for b, _ in again.gallery
    ]


@pytest.mark.parametrize(
    "prompt, changes, message",
    [
        ("", {}, "The prompt is empty"),
        (" \x00\t ", {}, "The prompt is empty"),
        ("x" * 1001, {}, "The prompt is 1,001 characters long; this app takes at most 1,000"),
        ("a red circle " * 10, {}, "The prompt is longer than this model's CLIP reads"),
        (PROMPT, {"num_images": 0}, "The number of images must be a whole number from 1 to 16"),
        (PROMPT, {"num_images": 2.5}, "The number of images must be a whole number"),
        (PROMPT, {"num_images": None}, "The number of images must be a whole number"),
        (PROMPT, {"temperature": 0}, "temperature must be a positive number, got 0.0"),
        (PROMPT, {"temperature": float("nan")}, "temperature must be a positive number"),
        (PROMPT, {"temperature": None}, "Temperature is empty: enter a number."),
        (PROMPT, {"top_k": -1}, r"Top-k \(0: off\) must be a whole number from 0 to 64"),
        (PROMPT, {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        (PROMPT, {"cfg_scale": -1}, "cfg_scale must be a number >= 0"),
        (PROMPT, {"seed": -1}, "Seed must be a whole number from 0 to 4294967295"),
        (PROMPT, {"rerank": 17}, "Reranking must be a whole number from 0 to 16"),
    ],
)
def test_a_mistake_in_a_request_is_one_sentence(requests, prompt, changes, message):
    with pytest.raises(ValueError, match=message):
        requests.text_to_image(prompt, GOOD._replace(**changes), True)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.png", b"not an image", "notes.png is not an image this app can read"),
        ("empty.png", b"", "empty.png is not an image this app can read"),
        ("bomb.png", decompression_bomb_png(), "bomb.png has more than 16,777,216 pixels"),
        ("claims.png", huge_header_png(), "claims.png has more than 16,777,216 pixels"),
        ("tiny.png", image_bytes(np.zeros((4, 9, 3), np.uint8), "PNG"), "tiny.png is 9x4 px"),
    ],
)
def test_a_source_that_cannot_be_read_is_one_sentence(requests, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        requests.variations(str(path), GOOD, 0)
    with pytest.raises(ValueError, match=message):
        requests.preview(str(path))


def test_no_source_and_too_many_kept_rows_are_one_sentence(requests, tmp_path):
    with pytest.raises(ValueError, match="No image given: drop a PNG, JPEG or WebP file"):
        requests.variations(None, GOOD, 0)
    path = str(write_picture(tmp_path / "source.png"))
    with pytest.raises(ValueError, match="Rows to keep must be a whole number from 0 to 8"):
        requests.variations(path, GOOD, 9)


@pytest.mark.parametrize(
    "mode, suffix",
    [("RGBA", "png"), ("L", "png"), ("I;16", "png"), ("CMYK", "jpg"), ("P", "gif"), ("1", "bmp")],
)
def test_a_source_of_any_mode_and_size_is_read(requests, tmp_path, mode, suffix):
    path = str(write_picture(tmp_path / f"source.{suffix}", (57, 31), mode))
    assert requests.preview(path).size == (32, 32)
    result = requests.variations(path, GOOD, 2)
    assert [image.size for image, _ in result.gallery] == [(32, 32)] * 2
    assert "keep_rows 2 · seed 0" in result.gallery[0][1]


def test_stop_ends_the_sampling_loop_at_the_next_code(requests):
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 5:
            requests.stop("tab")

    stopped = requests.text_to_image(PROMPT, GOOD, False, session="tab", progress=progress)
    assert stopped == (
        stopped.gallery,
        f"Stopped after 6 of {CODES} codes: no images were kept.",
        "",
    )
    assert stopped.gallery == [] and seen == [(done, CODES) for done in range(1, 6)]
    again = requests.text_to_image(PROMPT, GOOD, False, session="tab")  # the stop is spent
    assert len(again.gallery) == 2


def test_progress_counts_every_code_over_every_chunk(run_dir, tmp_path):
    pipeline = Pipeline.from_run_dir(run_dir, "cpu", batch_size=2)  # 5 images: 3 chunks
    steps = []
    pipeline.text_to_image(PROMPT, 5, SamplingOptions(seed=0), on_step=lambda *s: steps.append(s))
    assert steps == [(done, 3 * CODES) for done in range(1, 3 * CODES + 1)]
    steps.clear()
    source = write_picture(tmp_path / "source.png", (32, 32))
    pipeline.variations(
        source, 1, SamplingOptions(seed=0), keep_rows=3, on_step=lambda *s: steps.append(s)
    )
    assert steps[-1] == (CODES - 3 * 8, CODES - 3 * 8)


# ---------------------------------------------------------------------------------------------
# The app served: through gradio_client and in the browser


@pytest.fixture(scope="module")
def served(run_dir, pipeline) -> Served:
    """The app in this process, on a free loopback port, 4 images a request to start with."""
    needed("gradio")
    app = load_script("app.py")
    cfg = compose_config("app", [f"run_dir={run_dir}", f"port={free_port()}", "num_images=4"])
    requests = app.app_requests(pipeline, cfg)
    demo = app.build_app(requests, cfg)
    address = app.launch(demo, cfg)
    yield Served(address, requests)
    demo.close()


def test_a_script_calls_the_app_through_gradio_client(served, tmp_path):
    client_module = needed("gradio_client")
    from gradio_client.exceptions import AppError

    client = client_module.Client(served.address, verbose=False, download_files=str(tmp_path))
    settings = [3, 3.0, 1.0, 0, 1.0, 5, 0]  # images, cfg, temperature, top-k, top-p, seed, rerank
    gallery, note, command = client.predict(PROMPT, *settings, True, api_name="/text_to_image")
    assert [Image.open(item["image"]).size for item in gallery] == [(32, 32)] * 3
    assert "seed 5" in gallery[0]["caption"] and "seed=5" in command
    again, _, _ = client.predict(PROMPT, *settings, True, api_name="/text_to_image")
    assert [Path(a["image"]).read_bytes() for a in gallery] == [
        Path(b["image"]).read_bytes() for b in again
    ]
    with pytest.raises(AppError, match="The prompt is empty"):
        client.predict("  ", *settings, True, api_name="/text_to_image")
    upload = client_module.handle_file(str(write_picture(tmp_path / "source.png")))
    source, varied, note, _ = client.predict(upload, *settings, 1, api_name="/variations")
    assert Image.open(source).size == (32, 32)
    assert len(varied) == 3 and "3 variations of source.png" in note


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(served.address)
    yield page
    page.close()


def gallery_images(page, gallery: str, count: int) -> list[dict]:
    """Wait for `count` loaded images in the gallery; their natural and shown sizes."""
    page.wait_for_function(
        f"""() => {{
            const images = [...document.querySelectorAll('{gallery} img')];
            return images.length === {count} && images.every(i => i.complete && i.naturalWidth);
        }}""",
        timeout=60_000,
    )
    return page.evaluate(
        f"""[...document.querySelectorAll('{gallery} img')].map(i => ({{
            natural: [i.naturalWidth, i.naturalHeight],
            shown: Math.min(i.getBoundingClientRect().width, i.getBoundingClientRect().height),
            caption: i.alt,
        }}))"""
    )


def fill(page, box: str, value: str) -> None:
    field = page.locator(f"{box} input, {box} textarea").first
    field.fill(value)
    field.press("Tab")


def test_text_to_image_in_the_browser(page, tmp_path):
    fill(page, "#prompt", PROMPT)
    fill(page, "#seed", "3")
    page.click("#t2i-generate")
    images = gallery_images(page, "#t2i-gallery", 4)
    page.screenshot(path=tmp_path / "text_to_image.png", full_page=True)
    assert all(image["natural"] == [32, 32] and image["shown"] >= 256 for image in images)
    assert all("seed 3 · 4 images" in image["caption"] for image in images)
    assert "4 images for 'a small red circle' in" in page.inner_text("#t2i-note")
    assert "seed=3" in page.locator("#t2i-command textarea").input_value()


def test_variations_of_a_dropped_picture_in_the_browser(page, tmp_path):
    page.get_by_role("tab", name="Variations").click()
    page.set_input_files("#upload input[type=file]", str(write_picture(tmp_path / "mine.png")))
    page.wait_for_function("document.querySelector('#source img')?.naturalWidth === 32")
    assert page.locator("#source img").bounding_box()["width"] >= 256  # shown large
    page.click("#var-generate")
    images = gallery_images(page, "#var-gallery", 4)
    page.screenshot(path=tmp_path / "variations.png", full_page=True)
    assert all(image["natural"] == [32, 32] and image["shown"] >= 256 for image in images)
    assert "4 variations of mine.png in" in page.inner_text("#var-note")


def test_mistakes_are_a_message_in_the_page_and_the_next_request_works(page, tmp_path):
    page.get_by_role("tab", name="Variations").click()
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"not an image")
    page.set_input_files("#upload input[type=file]", str(notes))
    page.get_by_text("notes.png is not an image this app can read").first.wait_for()
    page.screenshot(path=tmp_path / "bad_file.png", full_page=True)
    page.get_by_role("tab", name="Text to image").click()
    fill(page, "#prompt", PROMPT)
    fill(page, "#temperature", "0")
    page.click("#t2i-generate")
    page.get_by_text("temperature must be a positive number, got 0.0").first.wait_for()
    page.screenshot(path=tmp_path / "bad_number.png", full_page=True)
    assert "Traceback" not in page.content()
    fill(page, "#temperature", "1")
    page.click("#t2i-generate")
    assert len(gallery_images(page, "#t2i-gallery", 4)) == 4


def test_stop_ends_a_running_generation_from_the_page(page, served, monkeypatch, tmp_path):
    draw = sampling.sample_from_logits

    def slow_draw(*args, **kwargs):  # a model slow enough to stop halfway: 64 codes, 13 s
        time.sleep(0.2)
        return draw(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_from_logits", slow_draw)
    fill(page, "#prompt", PROMPT)
    page.click("#t2i-generate")
    page.get_by_text(re.compile(r"Sampling codes")).first.wait_for(timeout=30_000)
    page.screenshot(path=tmp_path / "progress.png", full_page=True)
    page.click("#t2i-stop")
    note = page.locator("#t2i-note").get_by_text(re.compile(r"Stopped after \d+ of 64 codes"))
    note.wait_for()
    stopped_after = int(re.search(r"Stopped after (\d+) of", note.inner_text()).group(1))
    assert stopped_after < 64  # the loop ended early, not at its end
    assert not served.requests.generating.locked()  # the loop has ended, not only the page


# ---------------------------------------------------------------------------------------------
# The command


def test_the_command_serves_the_page_at_the_address_it_prints(run_dir):
    needed("gradio")
    port = free_port()
    command = [sys.executable, "scripts/app.py", f"run_dir={run_dir}", f"port={port}", "device=cpu"]
    app = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(180, app.kill)
    watchdog.start()
    try:
        lines = []
        while not any("Open http" in line for line in lines) and app.poll() is None:
            lines.append(app.stdout.readline())
        assert f"Open http://127.0.0.1:{port}/ in a browser" in "".join(lines), lines
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200 and "vqgan-dalle" in response.read().decode()
    finally:
        watchdog.cancel()
        app.terminate()
        app.wait(timeout=30)


def test_without_gradio_the_app_says_which_command_installs_it():
    hide_gradio = (
        "import runpy, sys; sys.modules['gradio'] = None; sys.argv = ['scripts/app.py']; "
        "runpy.run_path('scripts/app.py', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_gradio], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'Error: the app needs Gradio, which is not installed: pip install -e ".[app]"'
    )


def test_a_taken_port_is_one_sentence(served, run_dir):
    app = load_script("app.py")
    taken = served.address.rstrip("/").rsplit(":", 1)[1]
    cfg = compose_config("app", [f"run_dir={run_dir}", f"port={taken}"])
    demo = app.build_app(served.requests, cfg)
    with pytest.raises(ValueError, match=f"Cannot serve on 127.0.0.1:{taken}: the port is taken"):
        app.launch(demo, cfg)
