"""Text to images with a trained run: a PNG grid plus the single images, paths printed.

python scripts/sample.py run_dir=RUN prompt="a red circle" num_images=8 [seed=0] [cfg_scale=3]
python scripts/sample.py run_dir=RUN data=folder data.path=DIR held_out_prompts=5

The second prompts with the first 5 distinct captions of the folder's test split: what the run
makes of captions it never trained on.
"""

import re
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from generator.held_out import held_out_prompts, run_data_config
from generator.images import PromptedImages, output_dir, save_prompted_images
from generator.pipeline import DEFAULT_OPTIONS, Pipeline, resolve_device
from generator.sampling import SamplingOptions
from tokenizer.base.cli import run_command
from tokenizer.base.run_dir import RunDir


def quoted_prompt(argument: str) -> str:
    """`prompt=TEXT` with TEXT quoted for Hydra, so that any text reaches the pipeline's own
    cleaning: unquoted, Hydra's override grammar refuses letters beyond ASCII, control
    characters and undecodable bytes with a lexer error. Text the user quoted is left alone."""
    key, _, text = argument.partition("=")
    already_quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    if key != "prompt" or already_quoted:
        return argument
    return "prompt='" + re.sub(r"(\\*)('|$)", escape_for_quotes, text) + "'"


def escape_for_quotes(match: re.Match) -> str:
    """In Hydra's quoted strings only a quote and the backslashes before it (or before the
    end) are escaped; every other backslash is itself."""
    backslashes, quote = match.groups()
    return 2 * backslashes + ("\\" + quote if quote else "")


def prompts_of(cfg: DictConfig) -> list[str]:
    prompts = [*([] if cfg.prompt is None else [str(cfg.prompt)]), *map(str, cfg.prompts)]
    if cfg.held_out_prompts:
        data_config = run_data_config(cfg.get("data"), cfg.run_dir)
        prompts += held_out_prompts(data_config, cfg.split, cfg.held_out_prompts)
    if not prompts:
        raise ValueError(
            'No prompt given: pass prompt="a red circle" (or prompts=[...], or '
            "held_out_prompts=N with data=...)."
        )
    return prompts


def sample(cfg: DictConfig) -> None:
    run_dir = Path(cfg.run_dir)
    prompts = prompts_of(cfg)
    clip_config = instantiate(cfg.clip, _convert_="all") if cfg.get("clip") else None
    pipeline = Pipeline.from_run_dir(
        run_dir,
        resolve_device(cfg.device),
        clip_config,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
    )
    options = SamplingOptions.from_settings(cfg, DEFAULT_OPTIONS)
    generated = pipeline.text_to_image(prompts, cfg.num_images, options)
    name = generated.prompts[0] + (f" and {len(prompts) - 1} more" if len(prompts) > 1 else "")
    directory = Path(cfg.out) if cfg.out else output_dir(RunDir(run_dir).samples, name, cfg.seed)
    samples = PromptedImages(generated.prompts[:: cfg.num_images], generated.images, cfg.num_images)
    saved = save_prompted_images(directory, samples)
    print(saved.grid)
    print("\n".join(map(str, saved.singles)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_command(sample, cfg)


if __name__ == "__main__":
    sys.argv = [quoted_prompt(argument) for argument in sys.argv]
    main()
