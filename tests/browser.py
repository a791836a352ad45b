"""Headless Chromium for the report tests: Debian's `chromium` driven by Playwright.

Never downloads a browser (`playwright install` is not used): the system Chromium is
launched by path. Without it (or without the playwright package) the browser tests
fail under CI=true and are skipped with a message elsewhere.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"


def chromium_path() -> str | None:
    """The system Chromium: $CHROMIUM, else `chromium` / `chromium-browser` on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return shutil.which("chromium") or shutil.which("chromium-browser")


def unavailable(reason: str) -> None:
    """Fail under CI (the browser must be there), skip with the reason elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests need it under CI: {reason}")
    pytest.skip(reason)


@dataclass
class Console:
    """What a page said: console messages, uncaught errors, failed requests."""

    messages: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        bad = [f"console.{kind}: {text}" for kind, text in self.messages if kind in ("error", "warning")]
        return bad + [f"page error: {e}" for e in self.errors]


@contextmanager
def browser() -> Iterator[Any]:
    """A launched headless Chromium (Playwright's Browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install playwright)")
    path = chromium_path()
    if path is None:
        unavailable("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """One browser page reused across visits; records what each visit said on the console."""

    def __init__(self, b: Any, viewport: dict[str, int] | None = None, dark: bool = False) -> None:
        self.page = b.new_page(viewport=viewport or DESKTOP, color_scheme="dark" if dark else "light")
        self.console = Console()
        self.page.on("console", lambda m: self.console.messages.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.console.errors.append(f"request failed: {r.url}"))

    def visit(self, url: str, viewport: dict[str, int] | None = None, dark: bool | None = None) -> Any:
        """Load `url` (optionally at another size or colour scheme) with a fresh console record."""
        if viewport:
            self.page.set_viewport_size(viewport)
        if dark is not None:
            self.page.emulate_media(color_scheme="dark" if dark else "light")
        self.console = Console()
        self.page.goto(url)
        self.page.wait_for_load_state("load")
        return self.page

    def close(self) -> None:
        self.page.close()


def open_page(b: Any, url: str, viewport: dict[str, int] | None = None,
              dark: bool = False) -> tuple[Any, Console]:
    """A new page at `url`, with its console recorded from the start."""
    tab = Tab(b, viewport, dark)
    page = tab.visit(url)
    return page, tab.console


def screenshot(page: Any, name: str, full: bool = True) -> Path:
    """Save a screenshot under tests/screenshots/ (gitignored); its path."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    return path
