"""Browser fixtures: Debian's Chromium (never a downloaded browser) driven by Playwright against a
real ``kensa serve`` with the console, on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from console_scene import CHROMIUM, Scene, build_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    built = build_scene(tmp_path_factory.mktemp("console"))
    yield built
    assert built.server.stop() in (0, -15), built.server.log()[-2000:]
    log = built.server.log()
    assert "Traceback" not in log, log[-4000:]
    assert not any(key in log for key in built.keys.values())  # keys never reach the logs


# Module scope, not session: Playwright's sync API keeps an event loop running on the main thread
# while it is open, and every later test that calls asyncio.run() (the line stream, Prefect's sync
# client, the serving load tests) then fails with "cannot be called from a running event loop".
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing; `make chromium` installs Debian's chromium"
        if os.environ.get("KENSA_REQUIRE_SERVICES") == "1":  # CI: a missing browser fails
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    """A fresh browser context (no cookies) per test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    context.set_default_timeout(float(os.environ.get("KENSA_E2E_TIMEOUT_MS", "15000")))
    page = context.new_page()
    yield page
    context.close()
