"""Headless Chromium (Debian's chromium, driven by Selenium through chromium-driver) against
a running stack whose gateway serves the web page and the HTTP API.

`make browser` installs both (make test runs it first); without them these tests fail with
that advice, never skip. Screenshots go to test-artifacts/browser/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import Stack, running

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
DESKTOP = (1280, 1000)


def _require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: run `make browser` (installs Debian's chromium and "
            "chromium-driver; make test runs it)",
            pytrace=False,
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: run `make install` (the dev extra)", pytrace=False)


@pytest.fixture(scope="module")
async def web_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The four services; the gateway serves the page and /v1 on a free HTTP port."""
    stack = Stack(prefix=f"web{uuid.uuid4().hex[:8]}-", log_dir=tmp_path_factory.mktemp("logs"))
    async with running(stack):
        yield stack


@pytest.fixture(scope="module")
def chrome_starting() -> Iterator[Future[WebDriver]]:
    """Chromium starting in a thread of its own, so that it boots while the stack starts (a
    cold start of Chromium takes seconds); quit once the module's tests are done."""
    _require_browser()
    with ThreadPoolExecutor(max_workers=1) as pool:
        starting = pool.submit(_start_chrome)
        try:
            yield starting
        finally:
            if starting.exception(timeout=120) is None:
                starting.result().quit()


@pytest.fixture(scope="module")
def chrome(chrome_starting: Future[WebDriver], web_stack: Stack) -> WebDriver:
    """One headless Chromium for a module's tests; each test starts from a blank tab state.

    ``web_stack`` is asked for after ``chrome_starting``: the stack starts while Chromium boots.
    """
    return chrome_starting.result(timeout=120)


def _start_chrome() -> WebDriver:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--lang=en-US",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    return driver


def save_screenshot(driver: WebDriver, name: str) -> Path:
    """The whole page as test-artifacts/browser/<name>.png (the window grown to fit, then
    put back)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = driver.get_window_size()
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(size["width"], max(height + 140, 600))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path


def publish_screenshot(path: Path) -> None:
    """With UPDATE_DOCS_SCREENSHOT=1, the screenshot becomes docs/web-page.png (the README's);
    otherwise the committed one stays, so a test run leaves the tree clean."""
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, ROOT / "docs" / "web-page.png")
