"""A local web app over a trained run: text to image and variations in the browser.

    pip install -e ".[app]"
    python scripts/app.py run_dir=runs/quickstart [host=127.0.0.1] [port=7860]

The run is loaded once (`Pipeline.from_run_dir`) and served by Gradio, on loopback unless told
otherwise; generator/app_requests.py does the work of each request. Generations go through
Gradio's queue one at a time, show their progress from the sampling loop and stop at the next
code when the page's Stop is pressed. What a user gets wrong comes back as its sentence in the
page; a bug is logged here, the page says only that the request failed, and the server keeps
serving. Scripts reach the same two endpoints, /text_to_image and /variations, through
gradio_client.
"""

from __future__ import annotations

import functools
import html
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.app_requests import AppRequests, Limits, Result, Settings
from generator.pipeline import DEFAULT_OPTIONS, Pipeline, resolve_device
from generator.sampling import SamplingOptions
from tokenizer.base.cli import USER_ERRORS, run_command

try:
    import gradio as gr
except ModuleNotFoundError as missing:
    if missing.name != "gradio":
        raise
    sys.exit('Error: the app needs Gradio, which is not installed: pip install -e ".[app]"')

LOOPBACK = ("127.0.0.1", "localhost", "::1")
FAILED = "The request failed on the server (its log has the details); the app is still running."
CSS = """
.results img, #source img { image-rendering: pixelated; }
.results .grid-wrap { max-height: none !important; height: auto !important; }
#source img { width: 100% !important; height: 100% !important; object-fit: contain; }
"""


def shown_in_page(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A handler whose user errors are their sentence in the page and whose bugs are a
    traceback in the server's log and one line in the page; never a stack trace there."""

    @functools.wraps(handler)
    def answered(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except USER_ERRORS as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
        except Exception:
            traceback.print_exc()
            raise gr.Error(FAILED, print_exception=False) from None

    return answered


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def shown(result: Result) -> tuple:
    """A result as the gallery, note and command boxes show it."""
    return result.gallery, f"<p>{html.escape(result.note, quote=False)}</p>", result.command


def page_progress(progress: gr.Progress) -> Callable[[int, int], None]:
    return lambda done, total: progress((done, total), desc="Sampling codes", unit="codes")


Generation = Callable[[Any, Settings, Any, str | None, Callable[[int, int], None]], tuple]


def sampling_handler(generation: Generation) -> Callable[..., tuple]:
    """A page handler over `generation(subject, settings, detail, session, progress)`: the
    subject (the prompt or the source image), the shared sampling boxes, then the tab's own
    detail (the verdict switch or the rows to keep), in the order the page lists them."""

    @shown_in_page
    def handler(
        subject: Any,
        num_images: float | None,
        cfg_scale: float | None,
        temperature: float | None,
        top_k: float | None,
        top_p: float | None,
        seed: float | None,
        rerank: float | None,
        detail: Any,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio asks for progress)
    ) -> tuple:
        settings = Settings(num_images, cfg_scale, temperature, top_k, top_p, seed, rerank)
        return generation(subject, settings, detail, session_of(request), page_progress(progress))

    return handler


def handlers(requests: AppRequests) -> dict[str, Callable[..., Any]]:
    """The page's event handlers, by the event they serve."""

    def text_to_image(*inputs: Any) -> tuple:
        return shown(requests.text_to_image(*inputs))

    def variations(path: str | None, *inputs: Any) -> tuple:
        return (requests.preview(path), *shown(requests.variations(path, *inputs)))

    def stop(request: gr.Request) -> None:
        requests.stop(session_of(request))

    return dict(
        text_to_image=sampling_handler(text_to_image),
        variations=sampling_handler(variations),
        preview=shown_in_page(requests.preview),
        stop=stop,
    )


# ---------------------------------------------------------------------------------------------
# The page


def sampling_boxes(cfg: DictConfig, limits: Limits) -> list:
    """The settings both tabs share, starting at the config's values."""
    start = SamplingOptions.from_settings(cfg, DEFAULT_OPTIONS)
    return [
        gr.Slider(
            1, limits.max_images, cfg.num_images, step=1, label="Images", elem_id="num-images"
        ),
        gr.Number(start.cfg_scale, label="CFG scale (1: none)", elem_id="cfg-scale"),
        gr.Number(start.temperature, label="Temperature", elem_id="temperature"),
        gr.Number(start.top_k or 0, label="Top-k (0: off)", precision=0, elem_id="top-k"),
        gr.Number(start.top_p or 1, label="Top-p (1: off)", elem_id="top-p"),
        gr.Number(start.seed, label="Seed (blank: a new one)", precision=0, elem_id="seed"),
        gr.Slider(
            0,
            limits.max_rerank,
            start.rerank,
            step=1,
            label="Reranking (best of N by CLIP)",
            elem_id="rerank",
        ),
    ]


def results(prefix: str, columns: int) -> tuple:
    gallery = gr.Gallery(
        label="Images",
        elem_id=f"{prefix}-gallery",
        elem_classes="results",
        columns=columns,
        object_fit="contain",
        format="png",
        buttons=["download"],
        interactive=False,
    )
    note = gr.HTML(elem_id=f"{prefix}-note")
    command = gr.Textbox(label="Make these again", elem_id=f"{prefix}-command", buttons=["copy"])
    return gallery, note, command


def app_requests(pipeline: Pipeline, cfg: DictConfig) -> AppRequests:
    limits = Limits(
        cfg.max_images, cfg.max_rerank, cfg.max_prompt_chars, cfg.max_pixels, cfg.min_side
    )
    return AppRequests(pipeline, limits, str(cfg.run_dir))


ONE_AT_A_TIME = dict(concurrency_id="generation", concurrency_limit=1)  # through Gradio's queue


def text_to_image_tab(handle: dict[str, Callable], boxes: list, cfg: DictConfig) -> None:
    prompt = gr.Textbox(
        label="Prompt",
        placeholder="a small red circle",
        elem_id="prompt",
        max_length=cfg.max_prompt_chars,
    )
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
        stop = gr.Button("Stop", elem_id="t2i-stop")
    verdicts = gr.Checkbox(
        cfg.verdicts, label="Attribute checker's verdict under each image (shapes prompts)"
    )
    gallery, note, command = results("t2i", 3)
    gr.on(
        [go.click, prompt.submit],
        handle["text_to_image"],
        [prompt, *boxes, verdicts],
        [gallery, note, command],
        api_name="text_to_image",
        show_progress_on=gallery,
        **ONE_AT_A_TIME,
    )
    stop.click(handle["stop"], None, None, queue=False, api_visibility="private")


def variations_tab(handle: dict[str, Callable], boxes: list, cfg: DictConfig, rows: int) -> None:
    with gr.Column(scale=1, min_width=280):
        upload = gr.File(label="Source image: drop a PNG, JPEG or WebP", elem_id="upload")
        source = gr.Image(
            label="As the tokenizer reads it",
            elem_id="source",
            format="png",
            height=320,
            interactive=False,
            buttons=["download", "fullscreen"],
        )
        keep_rows = gr.Slider(
            0, rows, cfg.keep_rows, step=1, label="Rows to keep from its top", elem_id="keep-rows"
        )
        with gr.Row():
            vary = gr.Button("Make variations", variant="primary", elem_id="var-generate")
            stop = gr.Button("Stop", elem_id="var-stop")
    with gr.Column(scale=2):
        gallery, note, command = results("var", 2)
    vary.click(
        handle["variations"],
        [upload, *boxes, keep_rows],
        [source, gallery, note, command],
        api_name="variations",
        show_progress_on=gallery,
        **ONE_AT_A_TIME,
    )
    upload.change(handle["preview"], upload, source, api_visibility="private")
    stop.click(handle["stop"], None, None, queue=False, api_visibility="private")


def build_app(requests: AppRequests, cfg: DictConfig) -> gr.Blocks:
    """The page over the requests of a loaded pipeline, queued; `launch` serves it."""
    handle = handlers(requests)
    with gr.Blocks(title="vqgan-dalle", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## vqgan-dalle · `{html.escape(requests.run_dir)}`")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                boxes = sampling_boxes(cfg, requests.limits)
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Text to image"):
                    text_to_image_tab(handle, boxes, cfg)
                with gr.Tab("Variations"), gr.Row():
                    rows = requests.pipeline.vqgan.config.grid_size[0]
                    variations_tab(handle, boxes, cfg, rows)
    return demo.queue(max_size=cfg.queue_size)


def launch(demo: gr.Blocks, cfg: DictConfig) -> str:
    """Start serving in a background thread; the page's address."""
    try:
        _, address, _ = demo.launch(
            server_name=cfg.host,
            server_port=cfg.port,
            prevent_thread_lock=True,
            quiet=True,
            max_file_size=cfg.max_upload,
            css=CSS,
            footer_links=["api"],
        )
    except OSError:
        raise ValueError(
            f"Cannot serve on {cfg.host}:{cfg.port}: the port is taken or the host is not one "
            "of this machine's addresses; pass another port= (or host=)."
        ) from None
    if cfg.host not in LOOPBACK:
        print(f"Serving on {cfg.host}: anyone who can reach it can use the app (no login).")
    return address


def serve(cfg: DictConfig) -> None:
    clip_config = instantiate(cfg.clip, _convert_="all") if cfg.get("clip") else None
    print(f"Loading {cfg.run_dir} ...", flush=True)
    pipeline = Pipeline.from_run_dir(
        Path(cfg.run_dir), resolve_device(cfg.device), clip_config, batch_size=cfg.batch_size
    )
    demo = build_app(app_requests(pipeline, cfg), cfg)
    address = launch(demo, cfg)
    print(f"Open {address} in a browser; Ctrl+C stops the app.", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()


@hydra.main(version_base="1.3", config_path="../conf", config_name="app")
def main(cfg: DictConfig) -> None:
    run_command(serve, cfg)


if __name__ == "__main__":
    main()
