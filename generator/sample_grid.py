"""Sample grids while the generator trains: a look at what it draws for fixed prompts.

Every N training steps (and once at the end), the exported weights (the EMA ones where kept)
sample a few images for each of a fixed set of prompts, the tokenizer in RUN/tokenizer decodes
them, and the grid goes to RUN/logs/generator/samples/samples_step<step>.png: one column per
prompt, one row per draw. The prompts are read once into prompts.txt beside the grids.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
import torchvision
from lightning.pytorch.callbacks import Callback

from generator.conditioning import Condition
from generator.data import EncodedDataset
from generator.gpt import GPT
from generator.module import GeneratorModule
from generator.sampling import SamplingOptions, generate
from tokenizer.base.files import atomic_write, atomic_write_text
from tokenizer.base.training import whole_module
from tokenizer.evaluation import to_unit_range
from tokenizer.vqgan import VQGAN


class SamplePrompts(NamedTuple):
    condition: Condition  # N rows
    captions: list[str]


def sample_prompts(dataset: EncodedDataset, count: int) -> SamplePrompts:
    """The first `count` samples of a split: their caption's embedding (with its token
    features where the shards hold them), or their image's (labelled as such) where they have
    no caption."""
    samples = [dataset[index] for index in range(min(count, len(dataset)))]
    embeddings = [s.text_embedding if s.has_text else s.image_embedding for s in samples]
    captions = [s.caption if s.has_text else "(image embedding)" for s in samples]
    condition = Condition(torch.stack(embeddings))
    if samples and samples[0].text_tokens.numel():
        has_text = torch.stack([s.has_text for s in samples])
        tokens = torch.stack([s.text_tokens for s in samples])
        mask = torch.stack([s.text_mask for s in samples])
        condition = Condition(condition.pooled, tokens, mask, drop_tokens=~has_text)
    return SamplePrompts(condition, captions)


GUIDED_SEED_0 = SamplingOptions(cfg_scale=3.0, seed=0)


class SampleGrid(Callback):
    def __init__(
        self,
        tokenizer_dir: str | Path,
        prompts: SamplePrompts,
        directory: str | Path,
        every_n_steps: int,
        per_prompt: int = 2,
        options: SamplingOptions = GUIDED_SEED_0,
    ) -> None:
        if every_n_steps < 1 or per_prompt < 1:
            raise ValueError("samples.every_n_steps and samples.per_prompt must be at least 1.")
        self.tokenizer_dir = Path(tokenizer_dir)
        self.prompts = prompts
        self.directory = Path(directory)
        self.every_n_steps, self.per_prompt = every_n_steps, per_prompt
        self.options = options
        self.tokenizer: VQGAN | None = None
        self.last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, module: GeneratorModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: GeneratorModule) -> None:
        self.save(trainer, module)

    def save(self, trainer: L.Trainer, module: GeneratorModule) -> Path | None:
        step = trainer.global_step
        if step == self.last_step:
            return None
        self.last_step = step
        whole = whole_module(trainer, module)  # every rank takes part under FSDP
        if not trainer.is_global_zero:
            return None
        grid = self.grid(whole.exported_model.to(module.device))
        path = self.directory / f"samples_step{step:07d}.png"
        atomic_write(path, lambda tmp: torchvision.utils.save_image(grid, tmp, format="png"))
        prompts = self.directory / "prompts.txt"
        if not prompts.is_file():
            atomic_write_text(prompts, "\n".join(self.prompts.captions) + "\n")
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("samples", grid, step)
        return path

    @torch.inference_mode()
    def grid(self, model: GPT) -> torch.Tensor:
        """(3, H', W') in [0, 1]: one column per prompt, one row per draw."""
        device = next(model.parameters()).device
        if self.tokenizer is None:
            self.tokenizer = VQGAN.from_pretrained(self.tokenizer_dir, device=device)
        condition = self.prompts.condition.map(
            lambda t: t.to(device).repeat(self.per_prompt, *[1] * (t.ndim - 1))
        )
        codes = generate(model, condition, self.options)
        images = self.tokenizer.decode(codes.view(-1, *model.config.grid_size))
        return torchvision.utils.make_grid(to_unit_range(images), nrow=len(self.prompts.captions))
