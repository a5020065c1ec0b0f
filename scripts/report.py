"""Write RUN/report.html: evaluation numbers, reconstructions, samples, variations, curves.

python scripts/report.py run_dir=RUN [data=...] ['prompts=[...]'] [held_out_prompts=0]
                         [num_images=8] [sampling.seed=0] [samples_from=DIR]

The originals and the sources of variations are the first images of the data's `split`;
`held_out_prompts=N` adds the first N distinct captions of that split to the prompts.
`samples_from=DIR` shows the samples scripts/sample.py wrote to DIR (its out=) under their
prompts instead of sampling the prompts again.
"""

from dataclasses import replace
from pathlib import Path

import hydra
from omegaconf import DictConfig

from generator.held_out import held_out_images, held_out_prompts, run_data_config
from generator.pipeline import DEFAULT_OPTIONS
from generator.report import write_report
from generator.sampling import SamplingOptions
from tokenizer.base.cli import run_command


def report(cfg: DictConfig) -> None:
    data_config = run_data_config(cfg.data, cfg.run_dir)
    prompts = list(cfg.prompts)
    if cfg.held_out_prompts:
        prompts += held_out_prompts(data_config, cfg.split, cfg.held_out_prompts)
    if not prompts and cfg.samples_from is None:
        raise ValueError("No prompts for the report: pass prompts=[...] or held_out_prompts=N.")
    options = SamplingOptions.from_settings(cfg.sampling, DEFAULT_OPTIONS)
    varied = (
        options if cfg.variation_rerank is None else replace(options, rerank=cfg.variation_rerank)
    )
    path = write_report(
        Path(cfg.run_dir),
        held_out_images(data_config, cfg.split, cfg.num_originals),
        prompts,
        num_images=cfg.num_images,
        num_sources=cfg.num_sources,
        options=options,
        device=cfg.device,
        use_checker=data_config.source == "shapes",
        samples_from=cfg.samples_from,
        variation_options=varied,
    )
    print(f"Report written to {path}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run_command(report, cfg)


if __name__ == "__main__":
    main()
