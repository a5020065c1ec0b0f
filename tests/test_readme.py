"""The README's scale-out commands and preset table stay true to conf/ and the code."""

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SCALE_SECTION = "## Training on your own data at scale"
SCRIPT = re.compile(r"(?:^|/)scripts/(\w+)\.py$")


class Command(NamedTuple):
    script: str  # the root config's name, e.g. train_tokenizer
    overrides: list[str]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(title + "\n")
    end = text.find("\n## ", start + len(title))
    return text[start : end if end != -1 else len(text)]


def script_commands(markdown: str) -> list[Command]:
    """Every `scripts/<name>.py` invocation in the section's code blocks, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, word in enumerate(words) if SCRIPT.search(word)]
            if scripts:
                script = SCRIPT.search(words[scripts[0]]).group(1)
                commands.append(Command(script, words[scripts[0] + 1 :]))
    return commands


SCALE_COMMANDS = script_commands(readme_section(SCALE_SECTION))


def test_the_scale_section_runs_every_stage():
    scripts = {command.script for command in SCALE_COMMANDS}
    assert {"train_tokenizer", "encode", "train_generator", "sample", "variations"} <= scripts


@pytest.mark.parametrize(
    "command", SCALE_COMMANDS, ids=[f"{c.script}-{i}" for i, c in enumerate(SCALE_COMMANDS)]
)
def test_every_readme_command_composes(command):
    """Hydra refuses an unknown key, group option or value that does not parse."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=command.script, overrides=command.overrides)
    assert cfg.run_dir == "runs/photos"


PICTURES_COMMANDS = script_commands(readme_section("## Your own pictures"))


def test_the_own_pictures_section_fetches_trains_and_scores_a_whole_folder():
    scripts = [command.script for command in PICTURES_COMMANDS]
    assert {"fetch_openmoji", "train_tokenizer", "evaluate"} <= set(scripts)
    assert any("split=all" in command.overrides for command in PICTURES_COMMANDS)


@pytest.mark.parametrize(
    "command", PICTURES_COMMANDS, ids=[f"{c.script}-{i}" for i, c in enumerate(PICTURES_COMMANDS)]
)
def test_every_own_pictures_command_composes(command):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        compose(config_name=command.script, overrides=command.overrides)


@pytest.mark.slow
def test_the_readme_preset_table_is_what_the_script_prints():
    script = ROOT / "scripts" / "presets_table.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 5  # header, rule, tokenizer, two generators
    readme = (ROOT / "README.md").read_text().splitlines()
    assert [row for row in rows if row not in readme] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_measured_preset_memory_needs_a_gpu_and_says_so():
    script = ROOT / "scripts" / "presets_table.py"
    done = subprocess.run(
        [sys.executable, str(script), "--measure"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 1
    assert "--measure trains on a GPU and this machine has none" in done.stderr
    assert done.stdout == ""  # nothing computed before the refusal


def test_measured_steps_train_both_kinds_of_preset(monkeypatch):
    """presets_table --measure's steps, on the CPU at tiny sizes (no GPU here): the tokenizer and
    the generator each train the measured number of steps on their ready batches."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import presets_table

    from generator.bench import tokenizer as bench

    trainers, gpu_trainer = [], bench.bare_trainer

    def cpu_trainer(accelerator, precision, max_steps, **options):
        trainers.append(gpu_trainer("cpu", "32-true", max_steps, **options))
        return trainers[-1]

    monkeypatch.setattr(bench, "bare_trainer", cpu_trainer)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 123)
    for stage in ("tokenizer", "generator"):
        preset = presets_table.Preset(stage, "tiny", batch_size=2, trainer="gpu")
        assert presets_table.measured_peak(preset) == 123
        assert trainers[-1].global_step == presets_table.MEASURED_STEPS
