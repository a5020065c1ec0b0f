"""Benchmark the hot paths against their baselines; prints one JSON object last, writes `out`.

    python scripts/bench.py [device=cpu|cuda|auto] [sizes=auto|default|gpu|all] [out=bench.json]
    python scripts/bench.py device=cuda           # a GPU's ceilings, eager and CUDA graph sampling
    python scripts/bench.py quick=true            # tiny sizes, one repeat: the test suite's run
    python scripts/bench.py sections=[sampling] size_sets.default.generators=[small_256]

What it measures and how: generator/bench/; the sizes and the acceptance bars: conf/bench.yaml.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from generator.bench import run
from generator.bench.summary import summary
from tokenizer.base.cli import run_command
from tokenizer.base.files import atomic_write_text


def bench(cfg: DictConfig) -> dict[str, Any]:
    """Measure, write the JSON to `out`, print the summary, then the JSON; return the results."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    results = run(cfg)
    text = json.dumps(results, indent=2)
    atomic_write_text(Path(cfg.out), text + "\n")
    print(summary(results))
    print(f"\nWritten to {cfg.out}")
    print(text)
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_command(bench, cfg)


if __name__ == "__main__":
    main()
