"""Text -> images and image -> variations, end to end, from one run directory.

    pipeline = Pipeline.from_run_dir("runs/shapes")
    out = pipeline.text_to_image(["a small red circle"], 8, SamplingOptions(cfg_scale=3, seed=0))
    out.images  # (8, 3, H, W) in [0, 1]
    varied = pipeline.variations(["photo.png"], 4, keep_rows=2)

Loading reads RUN/tokenizer, the CLIP the run used (RUN/clip, or the one a config names) and
RUN/generator, and refuses them unless the generator was trained on this tokenizer's codes and
this CLIP's embeddings. Every input is checked before any sampling: prompts are cleaned of
control characters and invalid UTF-8, cut to CLIP's context with a warning, and refused when
empty; sampling options are checked by `SamplingOptions.check`; source images of
another size are cropped and resized with a warning, unreadable files are refused.

Text and image embeddings share CLIP's space, so one generator serves both: text-to-image
conditions on the prompt's text embedding, variations on the source's image embedding. With
`keep_rows=K`, a variation also keeps the top K rows of the source's own codes and samples
the rest (DALL·E-style completion). With `rerank=N`, N candidates are sampled per image and
the one CLIP finds closest to its condition is kept, as in DALL·E.

The generator samples in `precision` (fp32 by default, bf16, fp16, or auto: bf16 on a GPU that
supports it, fp32 on a CPU unless bf16 measures faster; generator/precision.py); its weights
are cast once, at load. The tokenizer and CLIP run in fp32.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from generator.clip import CLIPConfig, CLIPEncoder, load_clip
from generator.conditioning import Condition
from generator.export import Provenance, check_belongs_together, load_generator
from generator.gpt import GPT
from generator.images import fit_to_size, read_image, read_pil
from generator.precision import DTYPES, check_precision, probe_rows, sampling_precision
from generator.sampling import SamplingOptions, generate
from tokenizer.base.run_dir import RunDir, config_file
from tokenizer.evaluation import to_unit_range
from tokenizer.vqgan import VQGAN

# The pipeline samples with guidance unless told otherwise: what text-to-image users expect.
DEFAULT_OPTIONS = SamplingOptions(cfg_scale=3.0)
DEFAULT_BATCH_SIZE = 256  # images sampled at once; more are sampled in chunks of this many

ImageSource = str | Path | Image.Image | torch.Tensor


class Generated(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1], on the CPU, prompt by prompt
    codes: torch.Tensor  # (N, h, w) long, on the CPU
    prompts: list[str]  # (N,) the prompt of each image, as CLIP read it


class Variations(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) float in [0, 1], on the CPU, source by source
    codes: torch.Tensor  # (N, h, w) long, on the CPU
    sources: torch.Tensor  # (S, 3, H, W) float in [0, 1]: the sources as the tokenizer read them
    source_index: torch.Tensor  # (N,) long: which source each variation is of


class Sampled(NamedTuple):
    codes: torch.Tensor  # (N, h, w) long
    images: torch.Tensor  # (N, 3, H, W) float


def run_clip_config(run_dir: Path) -> CLIPConfig:
    """The CLIP of a run that trained its own (RUN/clip); other runs must name theirs."""
    clip_dir = RunDir(run_dir).clip
    if config_file(clip_dir).is_file():
        return CLIPConfig(source="trained")
    raise FileNotFoundError(
        f"{run_dir} holds no CLIP trained here ({clip_dir} is missing): name the CLIP "
        "the generator was trained with, as clip=<config> on the command line (the one "
        "scripts/encode.py used, e.g. clip=openai_vit_b32) or clip_config=CLIPConfig(...)."
    )


def clean_prompt(prompt: str | bytes) -> str:
    """Valid UTF-8 with control and format characters turned into spaces, whitespace collapsed.

    Invalid bytes (from a file or a terminal in another encoding) are dropped, not guessed.
    """
    if isinstance(prompt, bytes):
        text = prompt.decode("utf-8", errors="replace")
    else:
        try:  # undo Python's surrogate escapes of undecodable command-line bytes
            text = prompt.encode("utf-8", errors="surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            text = prompt.encode("utf-8", errors="replace").decode("utf-8")
    kept = "".join(
        " " if char == "\ufffd" or unicodedata.category(char).startswith("C") else char
        for char in text
    )
    return " ".join(kept.split())


def _check_count(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}.")


class Pipeline:
    """A run's tokenizer, CLIP and generator, checked to belong together.

    The generator is cast to `precision` (fp32, bf16, fp16 or auto), in place; `precision` then
    holds what it samples in, never auto.
    """

    def __init__(
        self,
        vqgan: VQGAN,
        clip: CLIPEncoder,
        model: GPT,
        provenance: Provenance,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "fp32",
    ) -> None:
        _check_count("batch_size", batch_size, 1)
        self.precision = sampling_precision(precision, model, probe_rows(batch_size))
        self.vqgan = vqgan.eval()
        self.clip = clip
        self.model = model.to(DTYPES[self.precision]).eval()
        self.provenance = provenance
        self.batch_size = batch_size

    @classmethod
    def from_run_dir(
        cls,
        run_dir: str | Path,
        device: str | torch.device = "cpu",
        clip_config: CLIPConfig | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "fp32",
    ) -> Pipeline:
        """Load RUN/tokenizer, the run's CLIP and RUN/generator, refusing parts that do not
        belong together. The CLIP is `clip_config` where given, else the one the generator's
        provenance names, else the run's own (RUN/clip). The generator samples in
        `precision` (see the module docstring)."""
        check_precision(precision)
        run_dir = Path(run_dir)
        run = RunDir(run_dir)
        vqgan = VQGAN.from_pretrained(run.tokenizer, device=device)
        model, provenance = load_generator(run.generator, device=device)
        clip_config = clip_config or provenance.clip or run_clip_config(run_dir)
        clip = load_clip(clip_config, run_dir, device)
        check_belongs_together(provenance, run_dir, clip.fingerprint(), config=model.config)
        return cls(vqgan, clip, model, provenance, batch_size, precision)

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    @property
    def image_size(self) -> int:
        return self.vqgan.config.image_size

    # -----------------------------------------------------------------------------------------
    # Public entry points

    def text_to_image(
        self,
        prompts: str | Sequence[str],
        num_images: int = 1,
        options: SamplingOptions = DEFAULT_OPTIONS,
        *,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Generated:
        """`num_images` images for each prompt, conditioned on its CLIP text embedding.

        `on_step(done, total)` follows the codes sampled, over all chunks (see `generate`);
        an exception it raises stops sampling."""
        self.check_options(options, num_images)
        prompts = self.prepare_prompts(prompts)
        condition = self.text_condition(prompts).repeat_interleave(num_images)
        codes, images = self.sample(condition, options, on_step=on_step)
        repeated = [prompt for prompt in prompts for _ in range(num_images)]
        return Generated(images, codes, repeated)

    def variations(
        self,
        images: ImageSource | Sequence[ImageSource],
        num_images: int = 1,
        options: SamplingOptions = DEFAULT_OPTIONS,
        *,
        keep_rows: int = 0,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Variations:
        """`num_images` variations of each source image, conditioned on its CLIP image embedding.

        Sources are image files, PIL images, or tensors (3, H, W) / (B, 3, H, W) in [-1, 1].
        `keep_rows=K` keeps the top K rows of each source's codes and samples the rest.
        `on_step` is text_to_image's.
        """
        self.check_options(options, num_images)
        height = self.vqgan.config.grid_size[0]
        if isinstance(keep_rows, bool) or not isinstance(keep_rows, int):
            raise ValueError(f"keep_rows must be an integer, got {keep_rows!r}.")
        if not 0 <= keep_rows <= height:
            raise ValueError(
                f"keep_rows must be from 0 to the code grid's {height} rows, got {keep_rows}; "
                "0 samples whole images, larger values keep more of the source's top."
            )
        sources = self.prepare_images(images).to(self.device)  # (S, 3, H, W) in [-1, 1]
        # the image's pooled embedding; fusions that read text token features read their null
        condition = Condition(self.clip.encode_image(sources)).repeat_interleave(num_images)
        kept = None
        if keep_rows:
            kept = self.vqgan.encode(sources)[:, :keep_rows].flatten(1)  # (S, K * w)
            kept = kept.repeat_interleave(num_images, dim=0)
        codes, varied = self.sample(condition, options, kept, on_step=on_step)
        index = torch.arange(sources.shape[0]).repeat_interleave(num_images)
        return Variations(varied, codes, to_unit_range(sources).cpu(), index)

    def text_condition(self, prompts: list[str]) -> Condition:
        """The prompts' CLIP text embeddings, with their token features where the generator's
        fusion reads them."""
        if not self.model.conditioner.needs_tokens:
            return Condition(self.clip.encode_text(prompts))
        words = self.model.config.word_embeddings
        return Condition(*self.clip.encode_text_tokens(prompts, word_embeddings=words))

    # -----------------------------------------------------------------------------------------
    # Checking inputs, before any work

    def check_options(self, options: SamplingOptions, num_images: int) -> None:
        """Raise a ValueError that says what to do for any option sampling cannot use."""
        _check_count("num_images", num_images, 1)
        options.check(self.model.config.vocab_size)

    def prepare_prompts(self, prompts: str | bytes | Sequence[str | bytes]) -> list[str]:
        """Cleaned prompts that fit CLIP's context; a clear error for an empty one."""
        if isinstance(prompts, str | bytes):
            prompts = [prompts]
        if not prompts:
            raise ValueError("No prompts given: pass at least one, e.g. prompt='a red circle'.")
        prepared = []
        for number, prompt in enumerate(prompts, start=1):
            if not isinstance(prompt, str | bytes):
                raise TypeError(f"prompt {number} is a {type(prompt).__name__}, not text.")
            text = clean_prompt(prompt)
            if not text:
                raise ValueError(
                    f"prompt {number} ({prompt!r}) is empty once control characters and "
                    "whitespace are removed: describe the image to generate, e.g. 'a red circle'."
                )
            if isinstance(prompt, bytes) or text != " ".join(prompt.split()):
                warnings.warn(
                    f"prompt {number} had invalid UTF-8 or control characters; using {text!r}.",
                    stacklevel=3,
                )
            prepared.append(self._fit_context(text))
        return prepared

    def _fit_context(self, prompt: str) -> str:
        """The prompt cut to what CLIP reads, with a warning when that loses words."""
        tokenizer = self.clip.tokenize
        encode, decode = getattr(tokenizer, "encode", None), getattr(tokenizer, "decode", None)
        context = getattr(tokenizer, "context_length", None)
        if not (callable(encode) and callable(decode) and isinstance(context, int)):
            return prompt  # a tokenizer that cannot count: it truncates by itself
        tokens = encode(prompt)
        room = context - 2  # the start and end tokens
        if len(tokens) <= room:
            return prompt
        kept = decode(tokens[:room]).strip()
        warnings.warn(
            f"the prompt {prompt!r} is {len(tokens) + 2} CLIP tokens but this CLIP reads "
            f"{context}: it was cut to {kept!r}. Shorten it to keep every word.",
            stacklevel=4,
        )
        return kept

    def prepare_images(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """Sources as one (S, 3, size, size) batch in [-1, 1], read and resized as needed."""
        if isinstance(images, torch.Tensor):
            return self._image_batch(images if images.ndim == 4 else images[None], "the image")
        if isinstance(images, str | Path | Image.Image):
            images = [images]
        if not images:
            raise ValueError("No source images given: pass at least one image or image file.")
        batch = []
        for number, image in enumerate(images, start=1):
            if isinstance(image, str | Path):
                tensor, what = read_image(image), str(image)
            elif isinstance(image, Image.Image):
                tensor, what = read_pil(image), f"image {number}"
            elif isinstance(image, torch.Tensor):
                tensor, what = image, f"image {number}"
            else:
                raise TypeError(
                    f"image {number} is a {type(image).__name__}: pass a file path, a PIL image "
                    "or a (3, H, W) tensor in [-1, 1]."
                )
            batch.append(self._image_batch(tensor[None], what))
        return torch.cat(batch)

    def _image_batch(self, images: torch.Tensor, what: str) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"{what}: expected float images of shape (3, H, W) or (B, 3, H, W) in [-1, 1], "
                f"got {images.dtype} of shape {tuple(images.shape)}."
            )
        if images.shape[0] == 0:
            raise ValueError("No source images given: pass at least one image or image file.")
        if not torch.isfinite(images).all():
            raise ValueError(f"{what} holds NaN or infinite values: pass a real image.")
        return fit_to_size(images.float(), self.image_size, what)

    # -----------------------------------------------------------------------------------------
    # Sampling

    @torch.no_grad()
    def sample(
        self,
        condition: Condition,
        options: SamplingOptions,
        prefix_codes: torch.Tensor | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Sampled:
        """Codes (N, h, w) and images (N, 3, H, W) in [0, 1], both on the CPU, for a condition
        of N rows, in chunks of `batch_size` sampled images.

        One generator seeded once draws every chunk, so a seed gives the same images for the
        same batch_size (a row's random draws depend on its place in the batch).
        """
        generator = None
        if options.seed is not None:
            generator = torch.Generator(self.device).manual_seed(options.seed)
        per_chunk = max(1, self.batch_size // options.candidates)
        codes, images = [], []
        starts = range(0, condition.batch_size, per_chunk)
        for number, start in enumerate(starts):
            chunk = slice(start, start + per_chunk)
            prefix = prefix_codes[chunk] if prefix_codes is not None else None
            steps = _chunk_steps(on_step, number, len(starts))
            chunk_codes, chunk_images = self._sample_chunk(
                condition.rows(chunk), prefix, options, generator, steps
            )
            codes.append(chunk_codes.cpu())
            images.append(to_unit_range(chunk_images).cpu())
        return Sampled(torch.cat(codes), torch.cat(images))

    def _sample_chunk(
        self,
        condition: Condition,
        prefix_codes: torch.Tensor | None,
        options: SamplingOptions,
        generator: torch.Generator | None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Sampled:
        """Sample `candidates` per condition and keep the one closest to it by CLIP."""
        candidates = options.candidates
        repeated = condition.repeat_interleave(candidates)
        if prefix_codes is not None:
            prefix_codes = prefix_codes.repeat_interleave(candidates, dim=0)
        # (N * candidates, T); the seed is already in `generator`
        flat = generate(
            self.model,
            repeated,
            replace(options, seed=None),
            prefix_codes=prefix_codes,
            generator=generator,
            on_step=on_step,
        )
        codes = flat.view(-1, *self.vqgan.config.grid_size)
        images = self.vqgan.decode(codes)  # (N * candidates, 3, H, W) in [-1, 1]
        if candidates == 1:
            return Sampled(codes, images)
        similarity = (self.clip.encode_image(images) * repeated.pooled.float()).sum(dim=-1)
        best = similarity.view(-1, candidates).argmax(dim=1)
        chosen = torch.arange(condition.batch_size, device=best.device) * candidates + best
        return Sampled(codes[chosen], images[chosen])


def _chunk_steps(
    on_step: Callable[[int, int], None] | None, chunk: int, chunks: int
) -> Callable[[int, int], None] | None:
    """`on_step(done, total)` over every chunk, called with one chunk's own count."""
    if on_step is None:
        return None
    return lambda done, total: on_step(chunk * total + done, chunks * total)


def resolve_device(name: str) -> torch.device:
    """A torch device; "auto" is CUDA where there is one, else the CPU. A device that is not
    here fails now, with what to use instead, rather than at the first tensor moved to it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device: use cpu, cuda or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but torch sees no GPU here: use device=cpu.")
    return device
