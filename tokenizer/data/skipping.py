"""Bad input never stops an epoch: a file that cannot be decoded is skipped and recorded in the
dataset's `SkipLog`, and `ReportingDataLoader` reports the epoch's skipped paths once, when the
epoch's iteration ends. The log lives in small files so DataLoader workers can share it.
"""

import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from typing import NamedTuple

from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


class Skipped(NamedTuple):
    path: str
    reason: str


def _remove_directory(directory: str, owner: int) -> None:
    if os.getpid() == owner:  # forked workers inherit the finalizer; only the owner cleans up
        shutil.rmtree(directory, ignore_errors=True)


def _describe(error: BaseException) -> str:
    """The error's type and first message, without object reprs such as <_io.BytesIO ...>."""
    message = str(error.args[0]) if error.args else str(error)
    return f"{type(error).__name__}: {re.sub(r' ?<[^<>]*>', '', message)}".rstrip(": ")


class SkipLog:
    """Files skipped as unreadable, shared between a DataLoader's worker processes.

    Each process appends to its own file in a private temporary folder; `report` gathers them.
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="skipped-images-")
        self.last_report: list[Skipped] = []
        weakref.finalize(self, _remove_directory, self.directory, os.getpid())

    def record(self, path: str, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else _describe(error)
        with open(os.path.join(self.directory, f"{os.getpid()}.jsonl"), "a") as file:
            file.write(json.dumps([path, reason]) + "\n")

    def drain(self) -> list[Skipped]:
        """Every file skipped since the last drain, once each, sorted by path."""
        found: dict[str, str] = {}
        for name in sorted(os.listdir(self.directory)):
            entry = os.path.join(self.directory, name)
            with open(entry) as file:
                for line in file:
                    path, reason = json.loads(line)
                    found.setdefault(path, reason)
            os.remove(entry)
        return [Skipped(path, found[path]) for path in sorted(found)]

    def report(self) -> list[Skipped]:
        """Log the skipped files once, keep them in `last_report`, and start a fresh count."""
        self.last_report = self.drain()
        if self.last_report:
            shown = 50
            lines = [f"  {path}: {reason}" for path, reason in self.last_report[:shown]]
            if len(self.last_report) > shown:
                lines.append(f"  ... and {len(self.last_report) - shown} more")
            logger.warning(
                "skipped %d unreadable file(s) this epoch:\n%s",
                len(self.last_report),
                "\n".join(lines),
            )
        return self.last_report


class ReportingDataLoader(DataLoader):
    """A DataLoader that reports its dataset's skipped files when an epoch's iteration ends."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        finally:
            skip_log = getattr(self.dataset, "skip_log", None)
            if skip_log is not None:
                skip_log.report()
