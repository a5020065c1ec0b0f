"""The whole job in one command: every stage, in order, into one run directory.

    python scripts/pipeline.py [experiment=quickstart] [run_dir=RUN] [stop_after=STAGE]
    python scripts/pipeline.py experiment=pictures images=/path/to/images [run_dir=RUN]

Each stage is the script a user would run by hand (scripts/train_tokenizer.py, ...), started as
a subprocess with the settings the experiment config gives it, so its progress bar shows as it
goes. After each stage one line tells its time and its headline number. A stage that finished
before with the same settings, and whose output is still there, is reused; once a stage runs
again, every later stage that reads the run directory runs again too. The state lives in RUN/pipeline.json.

A stage set `beside: <the stage before it>` does not read that stage's output and runs at the
same time, the cores split between them (tokenizer/base/side_by_side.py); its output goes to
RUN/logs/pipeline/<stage>.log and <stage>.log.stderr. Two trainings of about the same length,
on one core each, end sooner than one after the other on two: small models use two cores less
than twice as well as one.
"""

import csv
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from omegaconf import DictConfig, OmegaConf

from generator.report_tables import headline_numbers
from generator.shards import MANIFEST_FILE
from tokenizer.base.cli import run_command
from tokenizer.base.files import atomic_write_text
from tokenizer.base.run_dir import RunDir
from tokenizer.base.side_by_side import Finished, Job, run_side_by_side, script_command

SCRIPTS = Path(__file__).resolve().parent
PLAIN_VALUE = re.compile(r"[\w./:+-]+")


def override_value(value: Any) -> str:
    """A value in Hydra's override grammar: identifiers and numbers bare, text quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    if isinstance(value, str) and PLAIN_VALUE.fullmatch(value):
        return value
    return json.dumps(str(value))


def overrides(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """`{"a": {"b": 1}, "c": "x"}` -> `["a.b=1", "c=x"]`: a stage's settings as overrides."""
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += overrides(value, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}={override_value(value)}")
    return found


# ---------------------------------------------------------------------------------------------
# Headlines: the one number that says how a stage went, from what it printed or wrote


NOT_VALIDATED = (
    "not measured: validation never ran (the data has no validation split, or training ended "
    "before trainer.val_check_interval steps)"
)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _json_tail(stdout: str) -> dict[str, Any]:
    """The JSON object a script printed last, or {}."""
    start = stdout.rfind("\n{")
    try:
        return json.loads(stdout[start + 1 :] if start >= 0 else stdout)
    except json.JSONDecodeError:
        return {}


def _last_logged(run: RunDir, stage: str, key: str) -> float | None:
    """The last finite value of `key` in RUN/logs/<stage>/metrics.csv."""
    path = run.logs(stage) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as file:
        values = [float(row[key]) for row in csv.DictReader(file) if row.get(key)]
    finite = [value for value in values if math.isfinite(value)]
    return finite[-1] if finite else None


def _logged(run: RunDir, stage: str, key: str, show: Callable[[float], str]) -> str:
    value = _last_logged(run, stage, key)
    return NOT_VALIDATED if value is None else show(value)


def tokenizer_headline(run: RunDir, stdout: str) -> str:
    psnr = _logged(run, "tokenizer", "val/psnr", lambda value: f"{value:.2f} dB")
    usage = _last_logged(run, "tokenizer", "train/usage")
    usage_text = "not logged" if usage is None else _percent(usage)
    return f"val PSNR {psnr}, codebook usage {usage_text}"


def clip_headline(run: RunDir, stdout: str) -> str:
    summary = _json_tail(stdout)
    retrieval = summary.get("clip_retrieval")
    if not retrieval:
        top1 = _logged(run, "clip", "val/image_to_text_top1", _percent)
        return f"val image->caption top-1 within a batch {top1}"
    headline = (
        f"image->caption top-1 {_percent(retrieval['seen']['image_to_text_top1'])} on seen, "
        f"{_percent(retrieval['held_out']['image_to_text_top1'])} on held-out combinations "
        f"({_percent(retrieval['held_out_among_held_out'])} among held-out captions only)"
    )
    probe = summary.get("clip_swap_probe", {})
    swaps = [
        f"{swap} {score['percent_right']:.1f}%"
        for swap, score in probe.items()
        if math.isfinite(score["percent_right"])
    ]
    return headline + (f"; swap probe {', '.join(swaps)}" if swaps else "")


def encode_headline(run: RunDir, stdout: str) -> str:
    manifest = json.loads((run.encoded / MANIFEST_FILE).read_text())
    counts = [
        f"{sum(shard['num_samples'] for shard in split['shards']):,} {split['name']}"
        for split in manifest["splits"]
    ]
    return "samples encoded: " + ", ".join(counts)


def generator_headline(run: RunDir, stdout: str) -> str:
    return f"val loss {_logged(run, 'generator', 'val/loss', lambda value: f'{value:.3f}')}"


def images_headline(run: RunDir, stdout: str) -> str:
    written = [line for line in stdout.splitlines() if line.strip().endswith(".png")]
    return f"{len(written)} images written"


def last_line_headline(run: RunDir, stdout: str) -> str:
    lines = stdout.strip().splitlines()
    return lines[-1] if lines else "done"


def evaluate_headline(run: RunDir, stdout: str) -> str:
    results = json.loads(run.eval_file.read_text())
    numbers = headline_numbers(results).items()
    return "; ".join(f"{name} {value}" for name, value in numbers) or "eval.json written"


def report_headline(run: RunDir, stdout: str) -> str:
    return f"report at {run.report_file}"


HEADLINES: dict[str, Callable[[RunDir, str], str]] = {
    "train_tokenizer": tokenizer_headline,
    "train_clip": clip_headline,
    "encode": encode_headline,
    "train_generator": generator_headline,
    "make_shapes": last_line_headline,
    "sample": images_headline,
    "variations": images_headline,
    "evaluate": evaluate_headline,
    "report": report_headline,
}


# ---------------------------------------------------------------------------------------------
# Running the stages


def read_state(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).pipeline_state
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_arguments(cfg: DictConfig, stage: DictConfig) -> list[str]:
    arguments = [f"run_dir={cfg.run_dir}"] if stage.get("run_dir", True) else []
    if stage.get("data", False):
        arguments += list(cfg.common)
    settings = OmegaConf.to_container(stage.settings, resolve=True) if stage.settings else {}
    return arguments + overrides(settings)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def stage_groups(stages: dict[str, DictConfig]) -> list[list[str]]:
    """The stages in order, in groups that run at the same time: a stage set `beside` a stage
    of the group just before it joins that group."""
    groups: list[list[str]] = []
    for name, stage in stages.items():
        beside = stage.get("beside")
        if beside is None:
            groups.append([name])
        elif groups and beside in groups[-1]:
            groups[-1].append(name)
        else:
            raise ValueError(
                f"stages.{name}.beside={beside}: a stage can only run beside the stage just "
                f"before it; put {name} right after {beside} or remove its beside."
            )
    return groups


class GroupResult(NamedTuple):
    lines: list[str]  # the summary line of each stage of the group, in order
    ran: bool  # any stage ran (was not reused)


class StageRunner:
    """The stages of one pipeline run: which to reuse, how to start the others, and what each
    finished one leaves in RUN/pipeline.json."""

    def __init__(self, cfg: DictConfig, stages: dict[str, DictConfig]) -> None:
        self.cfg, self.stages = cfg, stages
        self.run_dir, self.run = Path(cfg.run_dir), RunDir(cfg.run_dir)
        self.state = read_state(self.run_dir)
        self.numbers = {name: f"[{n}/{len(stages)}]" for n, name in enumerate(stages, start=1)}

    def reusable(self, name: str, earlier_reran: bool) -> bool:
        """Finished before with the same settings, its output still there, and nothing it
        reads run again since."""
        stage, done = self.stages[name], self.state.get(name, {})
        reads_run = stage.get("run_dir", True)  # a stage that does not, needs no earlier one
        return (
            not (earlier_reran and reads_run)
            and done.get("arguments") == stage_arguments(self.cfg, stage)
            and (self.run_dir / stage.output).exists()
        )

    def reused_line(self, name: str) -> str:
        return f"{self.numbers[name]} {name:<11} reused   {self.state[name]['headline']}"

    def job(self, name: str, beside: str | None) -> Job:
        """The stage as a job, its command line printed (and where its output goes when it
        runs beside another stage)."""
        stage, arguments = self.stages[name], stage_arguments(self.cfg, self.stages[name])
        log_file = self.run.logs("pipeline") / f"{name}.log"
        where = f" (beside {beside}; its output goes to {log_file})" if beside else ""
        command = f"python scripts/{stage.script}.py {' '.join(arguments)}"
        print(f"\n{self.numbers[name]} {name}: {command}{where}", flush=True)
        return Job(name, script_command(SCRIPTS / f"{stage.script}.py", arguments), log_file)

    def record(self, finished: Finished) -> str:
        """Keep a finished stage's arguments, time and headline; returns its summary line."""
        name, stage = finished.name, self.stages[finished.name]
        headline = HEADLINES.get(stage.script, lambda *_: "done")(self.run, finished.stdout)
        self.state[name] = {
            "arguments": stage_arguments(self.cfg, stage),
            "seconds": round(finished.seconds, 1),
            "headline": headline,
        }
        atomic_write_text(self.run.pipeline_state, json.dumps(self.state, indent=2) + "\n")
        return f"{self.numbers[name]} {name:<11} {_clock(finished.seconds):>7}  {headline}"

    def run_group(self, group: list[str], earlier_reran: bool) -> GroupResult:
        """Run the group's stages that cannot be reused, side by side; returns the group's
        summary lines and whether any stage ran. A failed stage stops the pipeline once the
        others of its group have ended."""
        lines, jobs = {}, []
        for name in group:
            if self.reusable(name, earlier_reran):
                lines[name] = self.reused_line(name)
            else:
                jobs.append(self.job(name, beside=jobs[0].name if jobs else None))
        failed = []
        for finished in run_side_by_side(jobs) if jobs else []:
            if finished.returncode == 0:
                lines[finished.name] = self.record(finished)
            else:
                failed.append(
                    f"\nThe {finished.name} stage failed (exit code {finished.returncode}); its "
                    f"output is in {self.run.logs('pipeline')}/{finished.name}.log*. Fix the "
                    "cause and run the same command again: finished stages are reused and "
                    "training resumes from its last checkpoint."
                )
        if failed:
            raise SystemExit("\n".join(failed))
        return GroupResult([lines[name] for name in group], bool(jobs))


def chosen_stages(cfg: DictConfig) -> dict[str, DictConfig]:
    """The experiment's stages, up to `stop_after` where it is set."""
    stages = {name: stage for name, stage in cfg.stages.items() if stage is not None}
    if cfg.stop_after is None:
        return stages
    if cfg.stop_after not in stages:
        raise SystemExit(f"stop_after={cfg.stop_after} is not a stage: use one of {list(stages)}.")
    names = list(stages)
    return {name: stages[name] for name in names[: names.index(cfg.stop_after) + 1]}


def run_pipeline(cfg: DictConfig) -> None:
    unset = [key for key in cfg if OmegaConf.is_missing(cfg, key)]
    if unset:
        raise ValueError(
            f"This experiment needs {', '.join(unset)}: add it to the command, e.g. "
            f"{unset[0]}=/path/to/your/pictures."
        )
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    stages = chosen_stages(cfg)
    runner = StageRunner(cfg, stages)
    reran, summary = False, []
    start = time.monotonic()
    for group in stage_groups(stages):
        lines, ran = runner.run_group(group, reran)
        reran = reran or ran
        print("\n".join(lines), flush=True)
        summary += lines
    print(f"\nPipeline finished in {_clock(time.monotonic() - start)}:")
    print("\n".join(summary))
    print(f"Pictures: {runner.run.samples}, {runner.run.variations}")
    print(f"Report:   {runner.run.report_file}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    run_command(run_pipeline, cfg)


if __name__ == "__main__":
    main()
