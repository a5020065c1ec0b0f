"""Data-parallel training on CPU: two processes with the gloo backend.

The quantizer's codebook state is checked with two bare processes; each stage's script is run
by torchrun through tests/distributed_launcher.py, which records the samples each rank fetched
and each rank's trained state.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ROOT, TINY, make_encoded_run

from generator.export import load_generator
from generator.gpt import GPT
from tokenizer.quantizer import QuantizerConfig, VectorQuantizer

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 6
NONFINITE_STEP = 3  # rank 1 alone sees a NaN latent at this step
NO_VALIDATION = "trainer.limit_val_batches=0"  # the recorded fetches are then training's only


def quantizer_batches() -> torch.Tensor:
    """(STEPS, WORLD_SIZE, B, C, H, W) latents: each rank gets different data at every step."""
    batches = torch.randn(STEPS, WORLD_SIZE, 2, 4, 2, 4, generator=torch.Generator().manual_seed(1))
    return batches + torch.arange(WORLD_SIZE).view(1, -1, 1, 1, 1, 1)


def ema_quantizer(dead_code_steps: int) -> VectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook on every rank, as DDP makes it
    config = QuantizerConfig(
        num_codes=16, code_dim=4, l2_normalize=False, use_ema=True, dead_code_steps=dead_code_steps
    )
    return VectorQuantizer(config, latent_dim=4).train()


def train_quantizer_rank(rank: int, rendezvous: str, out: str) -> None:
    """One rank: a quantizer that restarts dead codes (rank 1 also meets a NaN batch) and one
    that only follows the EMA; both states are saved for the test to compare."""
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD_SIZE)
    batches = quantizer_batches()
    restarting, ema_only = ema_quantizer(dead_code_steps=2), ema_quantizer(dead_code_steps=0)
    for step in range(STEPS):
        latents = batches[step, rank].clone()
        ema_only(latents)
        if step == NONFINITE_STEP and rank == 1:
            latents[0, 0, 0, 0] = float("nan")
        restarting(latents)
    states = {"restarting": restarting.state_dict(), "ema_only": ema_only.state_dict()}
    torch.save(states, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_quantizer_replicas_share_ema_statistics_and_restarts(tmp_path):
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(train_quantizer_rank, args=(rendezvous, str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for name, value in ranks[0]["restarting"].items():
        assert torch.equal(value, ranks[1]["restarting"][name]), f"{name} differs between ranks"
    assert ranks[0]["restarting"]["num_restarted"] > 0

    one_process = ema_quantizer(dead_code_steps=0)  # sees both ranks' halves as one batch
    for step_batches in quantizer_batches():
        one_process(torch.cat(list(step_batches)))
    for name, value in one_process.state_dict().items():
        torch.testing.assert_close(ranks[0]["ema_only"][name], value, msg=f"{name} differs")


def torchrun(
    tmp_path: Path, dataset: str, script: str, *overrides: str, trainer: str = "ddp"
) -> str:
    """Run a script on two CPU processes; returns the output of both ranks."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        str(ROOT / "tests" / "distributed_launcher.py"),
        str(tmp_path),
        dataset,
        str(ROOT / "scripts" / script),
        f"trainer={trainer}",
        "trainer.accelerator=cpu",
        f"trainer.devices={WORLD_SIZE}",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def check_ranks(tmp_path: Path, num_samples: int) -> None:
    """Every sample fetched exactly once over both ranks, and identical trained replicas."""
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert all(len(rank["indices"]) == num_samples // WORLD_SIZE for rank in ranks)
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(num_samples))
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), f"{name} differs between ranks"


def test_tokenizer_trains_on_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer.limit_val_batches")]
    output = torchrun(
        tmp_path,
        "tokenizer.data:ShapesDataset",
        "train_tokenizer.py",
        f"run_dir={run_dir}",
        *tiny,
        "data.num_train=64",  # one epoch: 64 = 2 ranks x 4 steps x 8
        "trainer.max_steps=4",  # the discriminator joins at step 2
        NO_VALIDATION,
        "+tokenizer.model.quantizer.use_ema=true",
        "tokenizer.model.quantizer.dead_code_steps=1",
    )
    check_ranks(tmp_path, num_samples=64)
    assert output.count("Tokenizer written to") == 1
    assert output.count("2 device(s) x batch 8 x 1 accumulated = effective batch 16") == 1
    state = torch.load(tmp_path / "rank0.pt", weights_only=True)["state"]
    assert state["vqgan.quantizer.num_restarted"] > 0
    assert (run_dir / "tokenizer" / "model.safetensors").is_file()


def test_tokenizer_trains_on_uneven_webdataset_shards(tmp_path):
    """Three shards for two ranks: rank 0 reads two, so the ranks' epochs and validation sets
    differ in length; training, validation and the codebook statistics must still line up."""
    shards = tmp_path / "shards"
    make_shapes = [sys.executable, str(ROOT / "scripts" / "make_shapes.py"), f"out={shards}"]
    options = ["num_images=48", "format=webdataset", "image_size=32", "shard_size=16"]
    subprocess.run([*make_shapes, *options], check=True, capture_output=True)
    run_dir = tmp_path / "run"
    output = torchrun(
        tmp_path,
        "tokenizer.data:ShapesDataset",
        "train_tokenizer.py",
        f"run_dir={run_dir}",
        "tokenizer=tiny",
        "data=webdataset",
        f"data.path={shards}",
        "data.val_fraction=0.3",
        "data.batch_size=8",
        "data.num_workers=1",
        "trainer.log_every_n_steps=1",
        "trainer.max_steps=5",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=4",
    )
    assert output.count("Tokenizer written to") == 1
    with open(run_dir / "logs" / "tokenizer" / "metrics.csv") as file:
        usage = [row["val/usage"] for row in csv.DictReader(file) if row["val/usage"]]
    assert len(usage) == 2  # validations at steps 2 and 4, codes counted over both ranks


def test_clip_trains_on_two_processes(tmp_path):
    output = torchrun(
        tmp_path,
        "generator.clip.data:CaptionedDataset",
        "train_clip.py",
        f"run_dir={tmp_path / 'run'}",
        "clip=tiny",
        "data.batch_size=48",  # batches lose confusable captions: ranks' sizes differ
        "data.num_workers=0",
        "data.num_train=192",  # one epoch: 192 = 2 ranks x 2 steps x 48
        "eval_images=0",
        "trainer.max_steps=2",
        NO_VALIDATION,
    )
    check_ranks(tmp_path, num_samples=192)
    assert output.count("CLIP written to") == 1


def train_tiny_generator(tmp_path: Path, *overrides: str, trainer: str = "ddp") -> tuple[Path, str]:
    """The tiny generator for two steps on 16 encoded samples: one epoch, 2 ranks x 2 x 4."""
    run_dir = make_encoded_run(tmp_path / "run", num_train=16)
    output = torchrun(
        tmp_path,
        "generator.data:EncodedDataset",
        "train_generator.py",
        f"run_dir={run_dir}",
        "generator=tiny",
        "data.batch_size=4",
        "data.num_workers=0",
        "ema_decay=0.9",
        "trainer.max_steps=2",
        NO_VALIDATION,
        *overrides,
        trainer=trainer,
    )
    return run_dir, output


def test_generator_trains_on_two_processes(tmp_path):
    _, output = train_tiny_generator(tmp_path, "samples.every_n_steps=0")
    check_ranks(tmp_path, num_samples=16)
    assert output.count("Generator written to") == 1


def test_generator_trains_sharded_and_exports_whole_weights(tmp_path):
    """FSDP: each rank holds a shard of every weight; the export holds them whole."""
    run_dir, output = train_tiny_generator(
        tmp_path,
        "samples.every_n_steps=1",
        "trainer.strategy._target_=distributed_launcher.CPUFSDPStrategy",
        trainer="fsdp",
    )
    assert output.count("Generator written to") == 1
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank1["state"] is None  # rank 1 held shards only
    exported = load_generator(run_dir / "generator").model.state_dict()
    checkpoint = torch.load(run_dir / "checkpoints" / "generator" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    whole = GPT(load_generator(run_dir / "generator").model.config).state_dict()
    for name, value in exported.items():
        assert value.shape == whole[name].shape, f"{name} was exported as a shard"
        assert torch.equal(value, checkpoint["state_dict"][f"ema.model.{name}"]), name
    grids = sorted((run_dir / "logs" / "generator" / "samples").glob("samples_step*.png"))
    assert [path.name for path in grids] == ["samples_step0000001.png", "samples_step0000002.png"]
