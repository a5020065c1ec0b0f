"""Print the README's table of the real-size presets: sizes, memory per GPU, trainer config.

    python scripts/presets_table.py            # computed, on any machine
    python scripts/presets_table.py --measure  # and measured: a few real training steps on a GPU

Nothing is trained or allocated: every model is built under torch's FakeTensorMode, which
tracks shapes and dtypes without storage or compute, so the 300M generator costs seconds here.
The generators are sized for the photo_f16 tokenizer's codes and OpenAI ViT-B/32 embeddings.

Memory per GPU is for Lightning's `bf16-mixed` (fp32 weights, bf16 autocast) with AdamW:

  states       16 B per trained parameter (fp32 weights, fp32 gradients, AdamW's two fp32
               moments) and 4 B per frozen one (LPIPS's VGG)
  activations  the bytes of the distinct tensors autograd saves for backward in one training
               forward pass at the stated batch, loss included, under bf16 autocast; the bf16
               weight copies autocast makes count here, the fp32 parameters do not. The
               tokenizer runs as fake CUDA tensors under CUDA's autocast, which keeps group
               norms in fp32 (CPU's does not). The generator runs on the CPU, whose flash
               attention saves what CUDA's does (fake CUDA falls back to the math kernel,
               which would also save the attention weights); both autocasts treat its layers
               alike: linear layers in bf16, layer norms on the fp32 residual stream.
  ddp          states + activations + DDP's gradient buckets (4 B per trained parameter)
  fsdp         on 8 GPUs: states / 8 + activations + the fp32 weights FSDP holds gathered at
               once (everything outside the transformer blocks, and two blocks)

Not counted: transient buffers in backward (the largest is the fp32 gradient of the logits,
batch x 256 x 16,384 x 4 B for a generator), the CUDA context and the allocator's cache.

`--measure` checks the figures: each preset's own Lightning module trains MEASURED_STEPS steps
on random data of the stated batch on one GPU (bf16-mixed, AdamW, the tokenizer with LPIPS and
the GAN term on from the first step, where LPIPS's VGG weights are on disk), and the peak of
torch.cuda.max_memory_allocated is printed beside states + activations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import lpips
import open_clip
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.data import DataLoader

from generator.data import EncodedSample
from generator.module import GeneratorModule
from tokenizer import VQGAN, VQGANConfig
from tokenizer.data import Sample
from tokenizer.losses import VQGANLoss
from tokenizer.module import TokenizerModule

CONF = Path(__file__).resolve().parents[1] / "conf"
TOKENIZER = "photo_f16"
CLIP_MODEL = "ViT-B-32"
FSDP_GPUS = 8
GiB = 2**30
MEASURED_STEPS = 3


class Preset(NamedTuple):
    stage: str  # tokenizer or generator
    name: str  # the config in conf/<stage>/
    batch_size: int  # per GPU
    trainer: str  # which conf/trainer config fits it


PRESETS = [
    Preset("tokenizer", TOKENIZER, 16, "ddp"),
    Preset("generator", "base", 64, "gpu or ddp"),
    Preset("generator", "large", 64, "ddp; fsdp on GPUs under 32 GB"),
]


class Footprint(NamedTuple):
    trained: int  # parameters the optimisers update
    frozen: int  # parameters kept fixed (LPIPS)
    gathered: int  # parameters FSDP holds unsharded at once; 0 where FSDP does not apply
    sequence: str  # what one sample is
    activations: int  # bytes saved for backward at the batch size

    @property
    def states(self) -> int:
        """Bytes of fp32 weights, gradients and AdamW moments of the trained parameters, and
        of the frozen weights."""
        return 16 * self.trained + 4 * self.frozen


def compose_config(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def num_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@contextlib.contextmanager
def bf16_autocast(device: str) -> Iterator[None]:
    """bf16 autocast on `device`; torch.autocast refuses "cuda" without a GPU, fake CUDA
    tensors only need autocast switched on."""
    torch.set_autocast_dtype(device, torch.bfloat16)
    torch.set_autocast_enabled(device, True)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device, False)
        torch.clear_autocast_cache()


def saved_bytes(forward: Callable[[], object], modules: list[nn.Module], device: str) -> int:
    """Bytes of the distinct storages autograd saves while `forward` runs under bf16 autocast,
    leaving out the modules' own parameters (they are counted as states)."""
    parameters = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        bf16_autocast(device),
    ):
        forward()
    return sum(saved.values())


def tokenizer_config() -> VQGANConfig:
    cfg = compose_config("train_tokenizer", [f"tokenizer={TOKENIZER}"])
    return instantiate(cfg.tokenizer.model, _convert_="all")


def tokenizer_footprint(preset: Preset) -> Footprint:
    """One autoencoder step with every loss on (LPIPS and the GAN term): stage one's peak."""
    cfg = compose_config("train_tokenizer", [f"tokenizer={preset.name}"])
    model_config = instantiate(cfg.tokenizer.model, _convert_="all")
    loss_config = instantiate(cfg.tokenizer.loss, _convert_="all")
    with FakeTensorMode(), torch.device("cuda"):
        vqgan = VQGAN(model_config)
        loss = VQGANLoss(dataclasses.replace(loss_config, perceptual_weight=0.0))
        with warnings.catch_warnings():  # VGG16 without its weights: only the shapes matter
            warnings.simplefilter("ignore", UserWarning)
            loss.perceptual = lpips.LPIPS(
                net="vgg", pretrained=False, pnet_rand=True, verbose=False
            )
        loss.perceptual.requires_grad_(False)
        loss.perceptual.scaling_layer.cuda()  # buffers made by torch.Tensor(), on the CPU
        loss.eval()  # no adaptive weight: autograd.grad needs a real GPU, and saves nothing
        size = model_config.image_size
        images = torch.zeros(preset.batch_size, 3, size, size)

        def step() -> None:
            out = vqgan(images)
            last_layer = vqgan.decoder.last_layer
            loss.autoencoder_loss(
                images, out.reconstructions, out.quantizer_loss, last_layer, 2**40
            )

        activations = saved_bytes(step, [vqgan, loss], "cuda")
    return Footprint(
        trained=num_parameters(vqgan) + num_parameters(loss.discriminator),
        frozen=num_parameters(loss.perceptual),
        gathered=0,
        sequence=f"{size}x{size} px",
        activations=activations,
    )


def generator_module(preset: Preset) -> GeneratorModule:
    """The preset's GeneratorModule over photo_f16 codes and ViT-B/32 embeddings."""
    tokenizer = tokenizer_config()
    clip_dim = open_clip.get_model_config(CLIP_MODEL)["embed_dim"]
    # image conditioning: the same activations as text, without a data-dependent caption check
    cfg = compose_config("train_generator", [f"generator={preset.name}", "condition.mode=image"])
    model_config = instantiate(
        cfg.generator,
        vocab_size=tokenizer.quantizer.num_codes,
        grid_size=list(tokenizer.grid_size),
        clip_dim=clip_dim,
        _convert_="all",
    )
    optim = instantiate(cfg.optim, _convert_="all")
    condition = instantiate(cfg.condition, _convert_="all")
    return GeneratorModule.from_configs(model_config, optim, condition)


def generator_batch(module: GeneratorModule, batch_size: int) -> EncodedSample:
    """Random codes and unit-norm embeddings of one training batch."""
    config = module.model_config
    embedding = F.normalize(torch.randn(batch_size, config.clip_dim), dim=-1)
    return EncodedSample(
        codes=torch.randint(config.vocab_size, (batch_size, config.num_codes)),
        image_embedding=embedding,
        text_embedding=embedding,
        has_text=torch.ones(batch_size, dtype=torch.bool),
        caption=[""] * batch_size,
    )


def generator_footprint(preset: Preset) -> Footprint:
    with FakeTensorMode():
        module = generator_module(preset)
        model_config = module.model_config
        batch = generator_batch(module, preset.batch_size)

        def step() -> None:
            module.metrics(batch, training=True)

        activations = saved_bytes(step, [module], "cpu")
        model = module.model
    block = num_parameters(model.blocks[0])
    trained = num_parameters(model)
    return Footprint(
        trained=trained,
        frozen=0,
        gathered=trained - model_config.num_layers * block + 2 * block,
        sequence=f"{model_config.max_len} tokens",
        activations=activations,
    )


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.1f}"


def table_row(preset: Preset, footprint: Footprint) -> str:
    states = footprint.states
    ddp = states + footprint.activations + 4 * footprint.trained
    fsdp = "-"
    if footprint.gathered:
        gathered = 4 * footprint.gathered
        fsdp = gib(states / FSDP_GPUS + footprint.activations + gathered)
    cells = [
        f"`{preset.stage}={preset.name}`",
        f"{footprint.trained / 1e6:.1f}M",
        footprint.sequence,
        str(preset.batch_size),
        gib(states),
        gib(footprint.activations),
        gib(ddp),
        fsdp,
        preset.trainer,
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| preset | trained parameters | one sample | batch per GPU | states GiB | activations GiB "
    f"| per GPU, ddp GiB | per GPU, fsdp on {FSDP_GPUS} GiB | trainer |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|---|"
)


def measured_peak(preset: Preset) -> float:
    """Peak CUDA bytes allocated while the preset's module trains a few steps on one GPU."""
    from generator.bench.tokenizer import (  # as the benchmark trains
        bare_trainer,
        random_images,
        tokenizer_spec,
    )

    if preset.stage == "tokenizer":
        cfg = compose_config("train_tokenizer", [f"tokenizer={preset.name}"])
        spec = tokenizer_spec(cfg.tokenizer)
        module = TokenizerModule.from_configs(spec.model, spec.loss, spec.optim)
        images = random_images(preset.batch_size * MEASURED_STEPS, spec.model.image_size)
        batches = DataLoader([Sample(image, "") for image in images], batch_size=preset.batch_size)
    else:
        module = generator_module(preset)
        ready = [generator_batch(module, preset.batch_size) for _ in range(MEASURED_STEPS)]
        batches = DataLoader(ready, batch_size=None)  # a bare list would be read as many loaders
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = bare_trainer("gpu", "bf16-mixed", MEASURED_STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no loader workers, no validation: as intended
        trainer.fit(module, train_dataloaders=batches)
    return torch.cuda.max_memory_allocated()


MEASURED_HEADER = (
    "| preset | batch | computed states + activations GiB | measured peak GiB |\n"
    "|---|---:|---:|---:|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="train a few steps on a GPU too")
    measure = parser.parse_args().measure
    if measure and not torch.cuda.is_available():
        sys.exit("--measure trains on a GPU and this machine has none: run it without --measure.")
    rows, measured = [HEADER], [MEASURED_HEADER]
    for preset in PRESETS:
        count = tokenizer_footprint if preset.stage == "tokenizer" else generator_footprint
        footprint = count(preset)
        rows.append(table_row(preset, footprint))
        if measure:
            computed = footprint.states + footprint.activations
            cells = [f"`{preset.stage}={preset.name}`", str(preset.batch_size)]
            cells += [gib(computed), gib(measured_peak(preset))]
            measured.append("| " + " | ".join(cells) + " |")
    print("\n".join(rows))
    if measure:
        print("\n" + "\n".join(measured))


if __name__ == "__main__":
    main()
