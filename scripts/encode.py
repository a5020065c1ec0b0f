"""Encode a dataset for stage two: RUN/encoded/<split>/shard-*.safetensors + manifest.json.

    python scripts/encode.py run_dir=RUN [data=...] [clip=...] [splits=[train,val]] [tokens=true]
                             [word_embeddings=true] [overwrite=true]

Runs RUN/tokenizer and the CLIP once over each split; tokens=true also stores the CLIP's
per-token text and per-patch image features, for a conditioning that reads them, and
word_embeddings=true each caption token's word embedding beside its text feature. Run it again
after an interruption to resume from the last complete shard; on a finished encode it does
nothing.
"""

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.clip import load_clip, record_encoding_clip
from generator.encoding import encode_run
from generator.pipeline import resolve_device
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir


def encode(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run = RunDir(run_dir)
    device = resolve_device(cfg.device)
    clip_config = instantiate(cfg.clip, _convert_="all")
    clip = load_clip(clip_config, run_dir, device)
    outcome = encode_run(
        run_dir,
        instantiate(cfg.data, _convert_="all"),
        clip,
        splits=list(cfg.splits),
        shard_size=cfg.shard_size,
        device=device,
        overwrite=cfg.overwrite,
        tokens=cfg.tokens,
        word_embeddings=cfg.word_embeddings,
    )
    record_encoding_clip(clip_config, run.encoded)
    counts = ", ".join(f"{s.name}: {s.num_samples}" for s in outcome.manifest.splits)
    if outcome.already_done:
        print(f"{run_dir / 'encoded'} is already complete ({counts}): nothing to do.")
    else:
        print(f"Encoded shards written to {run_dir / 'encoded'} ({counts}).")


@hydra.main(version_base="1.3", config_path="../conf", config_name="encode")
def main(cfg: DictConfig) -> None:
    run_command(encode, cfg)


if __name__ == "__main__":
    main()
