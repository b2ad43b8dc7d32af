"""The ``browser`` fixture (re-exported by tests/conftest.py): headless Chromium for the explorer's browser tests
(Debian's ``chromium`` + ``chromium-driver``, driven by Selenium with the driver and binary paths given, so
Selenium Manager never downloads anything).

Tests that ask for ``browser`` are skipped, with the reason, when selenium, ``/usr/bin/chromium`` or
``/usr/bin/chromedriver`` is missing (``make test`` installs them when it runs as root on Debian/Ubuntu).
With ``ATTNKIT_REQUIRE_BROWSER=1`` they fail instead of skipping. Screenshots are kept under
``$ATTNKIT_ARTIFACTS`` (default ``runs/test-artifacts`` in the repository).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("ATTNKIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ATTNKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("ATTNKIT_ARTIFACTS", Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"))


class Page:
    """The driver, opened on one explorer file, with the helpers the tests share."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, path: Path, timeout: float = 20.0) -> float:
        """Load ``path``, wait for the page's ready flag; return ms from navigation start to ready."""
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get_log("browser")  # drop what earlier pages logged
        self.driver.get(Path(path).resolve().as_uri())
        WebDriverWait(self.driver, timeout).until(lambda d: d.execute_script("return window.__attnkitReady === true"))
        return float(self.driver.execute_script("return window.__attnkitReadyAt"))

    def errors(self) -> list[dict]:
        """Console entries at level SEVERE (JavaScript errors, failed loads) since the page was opened."""
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def hover(self, element, x: int | None = None, y: int | None = None) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        chain = ActionChains(self.driver)
        if x is None:
            chain.move_to_element(element)
        else:  # offsets from the element's centre
            chain.move_to_element_with_offset(element, x, y)
        chain.perform()

    def select(self, css: str, value: int) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find(css)).select_by_value(str(value))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, or make test)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (Path(path).is_file() or shutil.which(path)):
            return f"{path} not found (apt-get install {package}, or run make test as root)"
    return None


def _skip(reason: str) -> None:
    if os.environ.get("ATTNKIT_REQUIRE_BROWSER") == "1":  # a CI that must run them fails instead
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    reason = _missing()
    if reason:
        _skip(f"no headless browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:  # a browser that is installed but cannot start (no shared libraries, ...)
        _skip(f"headless chromium did not start: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    driver.set_page_load_timeout(60)
    try:
        yield Page(driver)
    finally:
        driver.quit()
