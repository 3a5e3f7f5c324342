"""Headless Chromium for browser tests: find it, take screenshots, dump the DOM, check screenshots."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

WINDOW = (1280, 900)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: when set, screenshots are also copied here (e.g. FCL_SCREENSHOT_DIR=docs/screenshots)
SCREENSHOT_DIR_ENV = "FCL_SCREENSHOT_DIR"


def find_chromium() -> str | None:
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _has_pillow() -> bool:
    return importlib.util.find_spec("PIL") is not None


#: skips a test, with the reason, where no Chromium (or no Pillow to read screenshots) is installed;
#: use together with @pytest.mark.browser
needs_chromium = pytest.mark.skipif(
    find_chromium() is None or not _has_pillow(),
    reason="needs a chromium binary on PATH (Debian: apt-get install -y chromium) and Pillow",
)


def _run(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    chromium = find_chromium()
    assert chromium is not None
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",  # tests run as root in containers
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)


def screenshot(url: str, out: Path, profile: Path, size: tuple[int, int] = WINDOW) -> Path:
    """A PNG of the page's first WIDTHxHEIGHT pixels."""
    _run([f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", url], profile)
    return out


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after loading, serialised as HTML."""
    return _run(["--dump-dom", url], profile).stdout


def keep_screenshot(path: Path, name: str) -> None:
    """Save a screenshot as $FCL_SCREENSHOT_DIR/name when that variable is set (256 colours: ~3x smaller)."""
    from PIL import Image

    target = os.environ.get(SCREENSHOT_DIR_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
            small.save(Path(target) / name, optimize=True)


def image_stats(path: Path) -> tuple[tuple[int, int], float]:
    """((width, height), standard deviation of the grey levels): ~0 for a blank page."""
    from PIL import Image, ImageStat

    with Image.open(path) as image:
        grey = image.convert("L")
        return image.size, float(ImageStat.Stat(grey).stddev[0])


class Elements(HTMLParser):
    """Every element of an HTML document as (tag, attributes), plus the document's text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def by_id(self, element_id: str) -> tuple[str, dict[str, str]] | None:
        return next((e for e in self.elements if e[1].get("id") == element_id), None)

    def all(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]
