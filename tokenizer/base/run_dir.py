"""The layout of a run directory: where every stage reads and writes, named once.

    RUN/
      tokenizer/     stage one's export: model.safetensors + config.json
      clip/          the CLIP trained here (where the run trains its own): the same two files
      encoded/       the encoded shards and their manifest.json
      generator/     stage two's export: model.safetensors + config.json + provenance.json
      checkpoints/<stage>/   Lightning checkpoints; last.ckpt is what a rerun resumes from
      logs/<stage>/          metrics.csv, image grids, Hydra's and the pipeline's logs
      samples/, variations/  what scripts/sample.py and scripts/variations.py write
      eval.json      scripts/evaluate.py's numbers
      report.html    scripts/report.py's page
      pipeline.json  which stages scripts/pipeline.py finished, with which settings

Every exported model folder holds its weights as WEIGHTS_FILE and its config as CONFIG_FILE.
`RunDirCheck` stops a script whose run_dir cannot be written, before Hydra writes into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback

from tokenizer.base.files import WriteError, check_writable

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory; nothing is created or read by building one."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def clip(self) -> Path:
        return self.root / "clip"

    @property
    def encoded(self) -> Path:
        return self.root / "encoded"

    @property
    def generator(self) -> Path:
        return self.root / "generator"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def variations(self) -> Path:
        return self.root / "variations"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.json"

    @property
    def report_file(self) -> Path:
        return self.root / "report.html"

    @property
    def pipeline_state(self) -> Path:
        return self.root / "pipeline.json"

    def checkpoints(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def logs(self, stage: str) -> Path:
        return self.root / "logs" / stage


def weights_file(model_dir: str | Path) -> Path:
    return Path(model_dir) / WEIGHTS_FILE


def config_file(model_dir: str | Path) -> Path:
    return Path(model_dir) / CONFIG_FILE


class RunDirCheck(Callback):
    """Hydra callback (conf: hydra.callbacks) that stops an unwritable run_dir with one sentence
    before Hydra creates its own folders in it and fails with a traceback. Hydra turns a
    callback's exceptions into warnings and goes on, hence SystemExit."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            check_writable(config.run_dir)
        except WriteError as error:
            raise SystemExit(f"Error: {error}") from None
