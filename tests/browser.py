"""A real browser for tests (`browser`): Debian's chromium, driven headless through its own chromedriver by Selenium,
emulating a phone's screen (390 x 844 CSS pixels, touch), so a page is laid out as a phone lays it out.

`Service("/usr/bin/chromedriver")` is named explicitly: Selenium Manager would otherwise try to download a driver,
which a test must never do (`make chromium`, which `.ci/run` runs, installs Debian's `chromium` and `chromium-driver`
when missing; without them the browser tests skip, and `.ci/run` fails on such a skip). `--no-sandbox` only
as root, where chromium refuses to start with its sandbox; `--disable-dev-shm-usage` because /dev/shm is small in
containers and chromium crashes when it fills.

Every page the test opens or reaches by a click is saved as a PNG under the test's tmp_path (`screens/01-*.png`,
...) and checked as a page of `cm serve` must be: no <script>, a viewport meta tag, and nothing wider than the
phone's screen (no horizontal scroll).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PHONE = (390, 844)  # an iPhone 12-15's screen in CSS pixels
WAIT_SECONDS = 15


def chrome_options() -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.add_argument("--headless=new")
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")
    options.add_argument("--disable-dev-shm-usage")
    # A phone, not a narrow desktop window (headless chromium's windows are at least 500 px wide): a touch screen
    # whose layout width comes from the page's viewport meta tag, as on a real phone.
    metrics = {"width": PHONE[0], "height": PHONE[1], "pixelRatio": 2.0, "touch": True}
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
    # Nothing the browser does on its own (updates, sync, first-run pages) should reach the network or slow it.
    for flag in ("--disable-extensions", "--no-first-run", "--disable-background-networking", "--disable-sync"):
        options.add_argument(flag)
    return options


def _gone(element: WebElement) -> bool:
    """The page that held `element` was replaced. Selenium's staleness_of, plus the other way chromedriver says so
    when the new page comes in mid-check ("Node with given id does not belong to the document", seen once in CI)."""
    try:
        return bool(expected_conditions.staleness_of(element)(None))
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise


@dataclass
class Browser:
    """The driver, and where the screenshots of this test go."""

    driver: webdriver.Chrome
    screens: Path
    shots: list[Path] = field(default_factory=list)

    def open(self, url: str) -> None:
        """Go to `url`, then shoot and check the page."""
        self.driver.get(url)
        self.page()

    def click(self, text: str) -> None:
        """Click the button (or link) whose text is `text`, wait for the page it leads to, then shoot and check it."""
        old = self.driver.find_element(By.TAG_NAME, "html")
        self.element(text).click()
        WebDriverWait(self.driver, WAIT_SECONDS).until(lambda _: _gone(old))
        self.page()

    def submit(self) -> None:
        """Press the page's one submit button (whatever it says), then as `click`."""
        buttons = self.driver.find_elements(By.CSS_SELECTOR, "form button:not([type=button]), input[type=submit]")
        visible = [b for b in buttons if b.is_displayed()]
        assert len(visible) == 1, f"{len(visible)} submit buttons on {self.driver.current_url}: {self.text()}"
        self.click(visible[0].text or visible[0].get_attribute("value") or "")

    def element(self, text: str) -> WebElement:
        """The one button, submit input or link whose visible text (or value) is `text`."""
        found = [
            e
            for e in self.driver.find_elements(By.CSS_SELECTOR, "button, input[type=submit], a")
            if (e.text or e.get_attribute("value") or "").strip() == text
        ]
        assert len(found) == 1, f"{len(found)} buttons or links {text!r} on {self.driver.current_url}: {self.text()}"
        return found[0]

    def fill(self, values: dict[str, str]) -> None:
        """Type into the form's fields by name (an empty value leaves the field empty)."""
        for name, value in values.items():
            field_ = self.driver.find_element(By.NAME, name)
            field_.clear()
            if value:
                field_.send_keys(value)

    def options(self, name: str) -> list[WebElement]:
        """The options of the select named `name`."""
        return list(Select(self.driver.find_element(By.NAME, name)).options)

    def text(self) -> str:
        """What the page says, as a person reads it (visible text)."""
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def page(self) -> Path:
        """Save a screenshot of the page, then check it (see `check_page`); returns the screenshot."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.driver.current_url.lower().split("://", 1)[-1])[:60].strip("-")
        shot = self.screens / f"{len(self.shots) + 1:02d}-{slug}.png"
        self.screens.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(shot)), f"no screenshot of {self.driver.current_url}"
        self.shots.append(shot)
        self.check_page()
        return shot

    def check_page(self) -> None:
        """A page of `cm serve`: no script at all, laid out for the phone (a viewport meta tag, which makes a phone
        use its own width) and nothing wider than the screen (no horizontal scroll)."""
        url = self.driver.current_url
        scripts = self.driver.find_elements(By.TAG_NAME, "script")
        assert scripts == [], f"{url} has {len(scripts)} <script> elements"
        viewport = self.driver.find_elements(By.CSS_SELECTOR, "meta[name=viewport]")
        content = viewport[0].get_attribute("content") or "" if viewport else ""
        assert "width=device-width" in content, f"{url} has no viewport meta tag of width=device-width"
        # A phone shrinks a page wider than its screen to fit (innerWidth grows past the screen's width), so both.
        scroll, inner = self.driver.execute_script("return [document.body.scrollWidth, window.innerWidth]")
        assert scroll <= inner <= PHONE[0], (
            f"{url} scrolls sideways on a phone: {scroll} px of content, a window of {inner} px ({PHONE[0]} px screen)"
        )


@pytest.fixture(name="browser")
def browser_fixture(tmp_path: Path) -> Iterator[Browser]:
    """A fresh headless chromium per test; its screenshots are in tmp_path / "screens"."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        # A skip that .ci/run refuses, as it refuses the PostgreSQL and Redis ones: CI installs them (`make chromium`).
        pytest.skip(f"browser: {CHROMIUM} or {CHROMEDRIVER} is missing (`make chromium` installs them)")
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(service=service, options=chrome_options())
    except WebDriverException as exc:
        pytest.fail(f"chromium did not start: {exc.msg}")
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield Browser(driver, tmp_path / "screens")
    finally:
        driver.quit()
