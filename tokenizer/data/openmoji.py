"""OpenMoji as a captioned image folder: real drawings for tests and measurements.

OpenMoji (https://openmoji.org, CC BY-SA 4.0) ships 4,495 colour SVG drawings in its npm
package, each with an `annotation` ("grinning face") and a `group` ("smileys-emotion") in
data/openmoji.json. `fetch_openmoji` gets the package with `npm pack` (npm's registry is the one
place it is published with its metadata), renders each drawing on white with cairosvg and
writes OUT/<group>/<hexcode>.png beside a .txt caption: the layout `data=folder` reads. Nothing
of it is committed to this repository.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

VERSION = "17.0.0"
LICENSE_NOTE = (
    "OpenMoji {version} (https://openmoji.org), by the OpenMoji contributors, licensed under "
    "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Rendered to PNG at "
    "{size} px on white; captions are OpenMoji's annotations.\n"
)


class MissingToolError(FileNotFoundError):
    """npm or cairosvg, which fetching OpenMoji needs, is not installed."""


class Drawing(NamedTuple):
    """One OpenMoji drawing as its metadata names it."""

    hexcode: str  # the file name of its SVG, e.g. "1F600"
    group: str  # e.g. "smileys-emotion"
    annotation: str  # e.g. "grinning face": the caption
    skin_tone_variant: bool = False  # the same drawing as another, in other skin tones


@dataclass(frozen=True)
class OpenMojiSelection:
    """Which drawings to write: `groups` keeps only those groups (empty: every group),
    `exclude_groups` drops groups, `max_per_group` keeps the first n of each (0: all).
    `skin_tones=False` leaves out the 2,030 skin-tone variants of 2,465 base drawings: a held-out
    variant has near-copies of itself in training, which flatters held-out figures."""

    groups: Sequence[str] = ()
    exclude_groups: Sequence[str] = ()
    max_per_group: int = 0
    skin_tones: bool = True

    def apply(self, drawings: list[Drawing]) -> list[Drawing]:
        known = {drawing.group for drawing in drawings}
        unknown = sorted((set(self.groups) | set(self.exclude_groups)) - known)
        if unknown:
            raise ValueError(
                f"OpenMoji has no group {', '.join(unknown)}: use some of {sorted(known)}."
            )
        kept, counts = [], {}
        for drawing in drawings:
            if self.groups and drawing.group not in self.groups:
                continue
            if drawing.group in self.exclude_groups:
                continue
            if drawing.skin_tone_variant and not self.skin_tones:
                continue
            counts[drawing.group] = counts.get(drawing.group, 0) + 1
            if self.max_per_group and counts[drawing.group] > self.max_per_group:
                continue
            kept.append(drawing)
        return kept


def npm_pack(package: str, directory: Path) -> Path:
    """Download `package` (name@version) from npm's registry into `directory`; its tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise MissingToolError(
            "npm is not installed, and OpenMoji is fetched with it: install Node.js's npm "
            "(apt-get install -y npm) and run this again."
        )
    result = subprocess.run(
        [npm, "pack", package, "--pack-destination", str(directory), "--silent"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise ConnectionError(
            f"npm pack {package} failed ({result.stderr.strip().splitlines()[-1:]}): check that "
            "this machine reaches the npm registry and run this again."
        )
    return directory / result.stdout.strip().splitlines()[-1]


def read_drawings(archive: tarfile.TarFile) -> list[Drawing]:
    """Every drawing listed in the package's data/openmoji.json, in its own order."""
    entries = json.load(archive.extractfile("package/data/openmoji.json"))
    return [
        Drawing(entry["hexcode"], entry["group"], entry["annotation"], bool(entry["skintone"]))
        for entry in entries
    ]


def render_svg(svg: bytes, size: int) -> bytes:
    """A PNG of `size` x `size` px of an SVG drawing on white."""
    try:
        import cairosvg  # an optional dependency: only fetching OpenMoji needs it
    except ImportError:
        raise MissingToolError(
            'cairosvg is not installed: pip install -e ".[openmoji]" and run this again.'
        ) from None
    return cairosvg.svg2png(
        bytestring=svg, output_width=size, output_height=size, background_color="white"
    )


class Written(NamedTuple):
    """What `fetch_openmoji` wrote."""

    num_written: int
    skipped: list[str]  # hexcodes whose SVG cairosvg could not render (a few use SVG markers)


def write_drawings(
    archive: tarfile.TarFile, drawings: list[Drawing], out: Path, size: int
) -> Written:
    """Render every drawing into OUT/<group>/<hexcode>.png with its caption beside it."""
    skipped = []
    for drawing in drawings:
        svg = archive.extractfile(f"package/color/svg/{drawing.hexcode}.svg").read()
        try:
            png = render_svg(svg, size)
        except MissingToolError:
            raise
        except Exception:  # cairosvg fails on a few drawings' markers; those are left out
            skipped.append(drawing.hexcode)
            continue
        folder = out / drawing.group
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{drawing.hexcode}.png").write_bytes(png)
        (folder / f"{drawing.hexcode}.txt").write_text(drawing.annotation + "\n", encoding="utf-8")
    return Written(len(drawings) - len(skipped), skipped)


def fetch_openmoji(
    out: str | Path,
    image_size: int = 64,
    selection: OpenMojiSelection = OpenMojiSelection(),
    version: str = VERSION,
) -> Written:
    """Write the selected OpenMoji drawings as a captioned folder at `out`."""
    if image_size < 8:
        raise ValueError(f"image_size is {image_size}: render at least 8 px.")
    out = Path(out)
    with tempfile.TemporaryDirectory() as download:
        tarball = npm_pack(f"openmoji@{version}", Path(download))
        with tarfile.open(tarball) as archive:
            drawings = selection.apply(read_drawings(archive))
            written = write_drawings(archive, drawings, out, image_size)
    (out / "LICENSE-openmoji.txt").write_text(
        LICENSE_NOTE.format(version=version, size=image_size), encoding="utf-8"
    )
    return written
