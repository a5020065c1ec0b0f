"""Real pictures for the tests: a few OpenMoji drawings per group, fetched once per session.

`scripts/fetch_openmoji.py`'s code gets them from npm's registry and renders them with
cairosvg. Where npm (or the registry) is missing the tests that need them skip with one line;
under CI (`CI` set, as .ci/run does, which also installs npm and cairo) they fail instead, so
that no test on real pictures is skipped there.
"""

import shutil
from pathlib import Path

import helpers

from tokenizer.data.openmoji import OpenMojiSelection, fetch_openmoji

INSTALL = "apt-get install -y npm libcairo2, then pip install -e '.[dev]'"


def unavailable(reason: str) -> None:
    helpers.unavailable(reason, INSTALL)


def openmoji_folder(out: Path, image_size: int, max_per_group: int) -> Path:
    """The first `max_per_group` drawings of every OpenMoji group as a captioned folder."""
    if shutil.which("npm") is None:
        unavailable("npm is not installed, and OpenMoji is fetched with it")
    try:
        fetch_openmoji(out, image_size, OpenMojiSelection(max_per_group=max_per_group))
    except (ConnectionError, FileNotFoundError) as error:
        unavailable(f"OpenMoji could not be fetched ({error})")
    return out
