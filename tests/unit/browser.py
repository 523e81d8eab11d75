"""Headless Debian chromium through selenium and chromedriver: a page as a reader's browser shows it.

`open_browser()` gives None with the reason where chromium, chromedriver or selenium is missing
(.ci/run installs them; elsewhere: apt-get install chromium chromium-driver; pip install selenium).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")

# What the page is checked for, read in the page itself after it loaded.
PAGE_FACTS = """return {
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
  tables: document.querySelectorAll('table').length,
  rows: Array.from(document.querySelectorAll('table')).map(t => t.rows.length),
  text: document.body.innerText.length,
  overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
  height: document.documentElement.scrollHeight};"""


def missing() -> str | None:
    """Why no browser can be opened here, or None."""
    for tool, fix in (("chromium", "apt-get install chromium"), ("chromedriver", "apt-get install chromium-driver")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({fix})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, part of peftlab[test])"
    return None


def open_browser(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="peftlab-chromium-")
    options.add_argument(f"--user-data-dir={profile}")  # fresh: nothing from an earlier session
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit chromedriver: selenium's own driver manager would try to download one.
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.profile_dir = profile
    return driver


def close_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def page_facts(driver, page: Path) -> tuple[dict, list[dict]]:
    """Load `page`; its facts (PAGE_FACTS) and the console's messages of level SEVERE."""
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")  # get() returns once the load event fired
    facts = driver.execute_script(PAGE_FACTS)
    errors = [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]
    return facts, errors


def full_page_screenshot(driver, page: Path, png: Path, width: int = 1280) -> None:
    """The whole page, top to bottom, at `width` CSS pixels."""
    facts, _ = page_facts(driver, page)
    driver.set_window_size(width, facts["height"] + 100)
    driver.save_screenshot(str(png))
