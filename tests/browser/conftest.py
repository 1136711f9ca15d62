"""A real headless Chromium for the browser tests: Debian's, driven by Playwright.

Playwright comes from PyPI; its own browser download is never used. The binary is
$FANOUT_CHROMIUM or the first Chromium on PATH (`.ci/run` installs Debian's); without
one, every browser test is skipped with one line saying what to install.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Headless, and quiet on a machine with no internet (no background fetches at start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """The Chromium binary: $FANOUT_CHROMIUM, else the first of CANDIDATES on PATH."""
    configured = os.environ.get("FANOUT_CHROMIUM")
    if configured:
        return configured
    for name in CANDIDATES:
        if found := shutil.which(name):
            return found
    return None


CHROMIUM = find_chromium()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM is not None:
        return
    skip = pytest.mark.skip(
        reason="no Chromium (apt-get install chromium, or set FANOUT_CHROMIUM); .ci/run installs it"
    )
    for item in items:
        if "tests/browser/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A fresh headless Chromium (its own empty profile), closed after the test."""
    assert CHROMIUM is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page in a context of its own (its own localStorage)."""
    context = await browser.new_context()
    try:
        yield await context.new_page()
    finally:
        await context.close()
