"""Every image under a folder, recursively, captioned by sidecar `.txt` files or a captions file
(.jsonl or .csv) that names images by their path.
"""

import csv
import json
import os
from pathlib import Path

from torch.utils.data import Dataset

from tokenizer.data.config import DataConfig, Sample
from tokenizer.data.images import ImageTransform, load_rgb
from tokenizer.data.skipping import SkipLog
from tokenizer.data.splits import split_of, split_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("captions.jsonl", "captions.csv")
PATH_COLUMNS = ("path", "file", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text")
MAX_BAD_IN_A_ROW = 64  # a folder where this many files in a row fail is broken, not noisy


def _relative_key(relative_path: str) -> str:
    return os.path.splitext(relative_path)[0]


def _read_captions_file(path: Path, root: Path) -> dict[str, str]:
    """path -> caption from a .jsonl (one object per line) or .csv (with a header) file.

    Paths are relative to the captions file's folder (or absolute); keys come back relative to
    `root` without their extension, so "a/b.jpg" in the file names the image a/b.<any ext>.
    """
    rows: list[tuple[int, dict]] = []
    with open(path, newline="", encoding="utf-8") as file:
        if path.suffix == ".csv":
            rows = list(enumerate(csv.DictReader(file), start=2))
        else:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        rows.append((number, json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number} is not JSON ({error}).") from None
    captions = {}
    for number, row in rows:
        fields = row if isinstance(row, dict) else {}
        image = next((fields[c] for c in PATH_COLUMNS if c in fields), None)
        caption = next((fields[c] for c in CAPTION_COLUMNS if c in fields), None)
        if image is None or caption is None:
            raise ValueError(
                f"{path}, line {number} needs a path ({'/'.join(PATH_COLUMNS)}) and a caption "
                f"({'/'.join(CAPTION_COLUMNS)}) field."
            )
        full = Path(image) if os.path.isabs(image) else path.parent / image
        relative = os.path.relpath(os.path.normpath(full), root)
        captions[_relative_key(Path(relative).as_posix())] = str(caption)
    return captions


class FolderDataset(Dataset):
    """Every image under a folder, recursively, with captions where there are any.

    A caption comes from a sidecar `.txt` next to the image (same name), else from a captions
    file. An unreadable file is recorded in `skip_log` and the next file stands in for it.
    """

    def __init__(self, config: DataConfig, split: str, train: bool | None = None) -> None:
        source = split_source(config, split)
        self.root = Path(source.path).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist: set data.path to a folder of images."
            )
        images, sidecars = self._scan()
        if not images:
            raise ValueError(
                f"no images under {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}): "
                "check data.path."
            )
        if source.split is not None:
            fractions = (source.val_fraction, source.test_fraction)
            images = [f for f in images if split_of(_relative_key(f), *fractions) == source.split]
        self.files = images  # paths relative to root, posix style
        self.sidecars = sidecars
        self.captions = self._captions_file(config)
        self.transform = ImageTransform(config, train=split == "train" if train is None else train)
        self.max_pixels, self.alpha_background = config.max_image_pixels, config.alpha_background
        self.image_size = config.image_size
        self.skip_log = SkipLog()

    def _scan(self) -> tuple[list[str], dict[str, str]]:
        images, sidecars = [], {}
        for directory, subdirectories, names in os.walk(self.root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            relative = Path(directory).relative_to(self.root)
            for name in sorted(names):
                extension = os.path.splitext(name)[1].lower()
                if extension in IMAGE_EXTENSIONS:
                    images.append((relative / name).as_posix())
                elif extension == ".txt":
                    sidecar = (relative / name).as_posix()
                    sidecars[_relative_key(sidecar)] = sidecar
        return images, sidecars

    def _captions_file(self, config: DataConfig) -> dict[str, str]:
        if config.captions_file:
            path = Path(config.captions_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"captions file {path} does not exist: fix data.captions_file."
                )
            return _read_captions_file(path, self.root)
        for name in CAPTION_FILES:
            if (self.root / name).is_file():
                return _read_captions_file(self.root / name, self.root)
        return {}

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, relative_path: str) -> str:
        key = _relative_key(relative_path)
        sidecar = self.sidecars.get(key)
        if sidecar is not None:
            try:
                return (self.root / sidecar).read_text(encoding="utf-8", errors="replace").strip()
            except OSError as error:
                self.skip_log.record(str(self.root / sidecar), error)
        return self.captions.get(key, "")

    def load(self, index: int) -> Sample | None:
        """File `index` as a sample, or None (and a record in skip_log) if it cannot be read."""
        relative = self.files[index]
        path = self.root / relative
        try:
            image = load_rgb(path, self.max_pixels, self.alpha_background, self.image_size)
        except Exception as error:  # Pillow raises many types on bad data; none may stop an epoch
            self.skip_log.record(str(path), error)
            return None
        return Sample(self.transform(image), self.caption(relative))

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        for step in range(min(MAX_BAD_IN_A_ROW, len(self.files))):
            sample = self.load((index + step) % len(self.files))
            if sample is not None:
                return sample
        raise RuntimeError(
            f"{MAX_BAD_IN_A_ROW} files in a row under {self.root} could not be read (see the log "
            "of skipped files): the folder looks broken, check its contents."
        )
