"""Write shapes-benchmark examples to look at or to train from: a folder or WebDataset shards.

    python scripts/make_shapes.py [out=runs/shapes_preview] [num_images=64] [split=train]
                                  [format=folder|webdataset] [image_size=64] [seed=0]

A folder gets NNNNNN.png, a sidecar NNNNNN.txt caption for each, and captions.jsonl with every
image's caption and attributes. Shards follow the img2dataset layout (png + txt + json). Both
read back with data=folder or data=webdataset.
"""

import dataclasses
import io
import json
from pathlib import Path

import hydra
import webdataset as wds
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from tokenizer.base.cli import run_command
from tokenizer.shapes import SPLITS, ShapesConfig, ShapesExample, generate, is_held_out

FORMATS = ("folder", "webdataset")


@dataclasses.dataclass
class MakeShapesConfig:
    out: str = "runs/shapes_preview"
    num_images: int = 64
    split: str = "train"
    format: str = "folder"  # one of FORMATS
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 2
    seed: int = 0
    shard_size: int = 1000  # images per .tar shard


def _png(example: ShapesExample) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(example.image).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(example: ShapesExample, split: str, index: int) -> dict:
    return {
        "caption": example.caption,
        "scene": dataclasses.asdict(example.scene),
        "held_out": is_held_out(example.scene),
        "split": split,
        "index": index,
    }


def write_folder(out: Path, examples, split: str) -> None:
    with open(out / "captions.jsonl", "w") as captions:
        for index, example in examples:
            name = f"{index:06d}"
            (out / f"{name}.png").write_bytes(_png(example))
            (out / f"{name}.txt").write_text(example.caption + "\n")
            captions.write(json.dumps({"path": f"{name}.png", **_record(example, split, index)}))
            captions.write("\n")


def write_shards(out: Path, examples, split: str, shard_size: int) -> None:
    pattern = str(out / "shapes-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for index, example in examples:
            writer.write(
                {
                    "__key__": f"{index:06d}",
                    "png": _png(example),
                    "txt": example.caption,
                    "json": json.dumps(_record(example, split, index)),
                }
            )


def _check(cfg: MakeShapesConfig, out: Path) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: use one of {FORMATS}.")
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}: use one of {SPLITS}.")
    if cfg.num_images < 1 or cfg.shard_size < 1:
        raise ValueError("num_images and shard_size must be at least 1.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose another out= or remove it first.")


ConfigStore.instance().store(name="make_shapes_schema", node=MakeShapesConfig)
ConfigStore.instance().store(
    name="make_shapes",
    node={
        "defaults": [
            "make_shapes_schema",
            "_self_",
            {"override hydra/job_logging": "none"},
            {"override hydra/hydra_logging": "none"},
        ],
        # Hydra would otherwise write its logs and a config copy; this script writes only `out`.
        "hydra": {"run": {"dir": "."}, "output_subdir": None},
    },
)


def make_shapes(cfg: DictConfig) -> None:
    config = MakeShapesConfig(**OmegaConf.to_container(cfg, resolve=True))
    out = Path(config.out).expanduser()
    _check(config, out)
    shapes = ShapesConfig(config.image_size, config.min_objects, config.max_objects, config.seed)
    out.mkdir(parents=True, exist_ok=True)
    examples = ((i, generate(shapes, config.split, i)) for i in range(config.num_images))
    if config.format == "folder":
        write_folder(out, examples, config.split)
    else:
        write_shards(out, examples, config.split, config.shard_size)
    print(f"Wrote {config.num_images} {config.split} images to {out.resolve()}")


@hydra.main(version_base="1.3", config_path=None, config_name="make_shapes")
def main(cfg: DictConfig) -> None:
    run_command(make_shapes, cfg)


if __name__ == "__main__":
    main()
