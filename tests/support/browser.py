"""A real browser for the approvals pages: Debian's ``chromium`` driven by Playwright.

Playwright's own browser downloads are not used (not reachable here, and not needed): the
machine's ``/usr/bin/chromium`` (``make system-packages`` installs it) is launched through
``executable_path``, headless, with nothing that reaches the network on its own, in a fresh
profile Playwright creates for each launch. `browser` is one browser per test module, closed on
every path; it fails loudly (never skips) when chromium is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = Path(os.environ.get("BROKER_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> Path:
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return Path(found)
    raise RuntimeError(
        f"{CHROMIUM} not found: the approvals page tests need Debian's chromium package "
        "(make system-packages installs it: apt-get install chromium)"
    )


@contextmanager
def launch_chromium() -> Iterator[Browser]:
    """Chromium under Playwright, stopped (browser, then driver) however the block ends."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable), headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One chromium per test module (each test opens its own context: its own cookies)."""
    with launch_chromium() as running:
        yield running
