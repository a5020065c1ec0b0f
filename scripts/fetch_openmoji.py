"""Fetch OpenMoji's drawings (npm's registry) and write them as a captioned image folder.

    python scripts/fetch_openmoji.py out=data/openmoji [image_size=64]
                                     [groups=[food-drink]] [exclude_groups=[food-drink]]
                                     [max_per_group=0] [skin_tones=true]

Writes OUT/<group>/<hexcode>.png (on white) with a .txt caption each (OpenMoji's annotation),
the layout `data=folder` reads; see tokenizer/data/openmoji.py. Needs npm and cairosvg
(`pip install -e ".[openmoji]"`).
"""

import hydra
from omegaconf import DictConfig

from tokenizer.base.cli import run_command
from tokenizer.data.openmoji import OpenMojiSelection, fetch_openmoji


def fetch(cfg: DictConfig) -> None:
    selection = OpenMojiSelection(
        tuple(cfg.groups), tuple(cfg.exclude_groups), cfg.max_per_group, cfg.skin_tones
    )
    written = fetch_openmoji(cfg.out, cfg.image_size, selection, cfg.version)
    print(f"{written.num_written} OpenMoji drawings written to {cfg.out}")
    if written.skipped:
        print(f"{len(written.skipped)} that cairosvg cannot render left out: {written.skipped}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="fetch_openmoji")
def main(cfg: DictConfig) -> None:
    run_command(fetch, cfg)


if __name__ == "__main__":
    main()
