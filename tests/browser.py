"""What the browser tests share: headless Chromium through Playwright, a free loopback port.

The tests drive Debian's Chromium (Playwright's own browser download is not needed). On a
machine without it they skip with one line; under CI (`CI` set, as .ci/run does, which also
installs Chromium) a missing browser or package fails the run instead, so that no browser test
is skipped there.
"""

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import helpers

CHROMIUM_NAMES = ("chromium", "chromium-browser")
INSTALL = "apt-get install -y chromium, then pip install -e '.[dev]'"


def unavailable(reason: str) -> None:
    helpers.unavailable(reason, INSTALL)


def chromium_path() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    unavailable("no headless Chromium here")


def needed(module: str) -> ModuleType:
    """An optional package the browser and app tests use, or their skip (their failure in CI)."""
    try:
        return __import__(module)
    except ImportError:
        unavailable(f"the tests need {module}, which is not installed")


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium, Playwright's Browser, closed afterwards."""
    needed("playwright")
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
