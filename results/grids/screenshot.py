"""results/grids/report.png: the committed report.html as headless chromium shows it, top to bottom.

    python results/grids/screenshot.py   # needs chromium, chromium-driver and selenium (tests/unit/browser.py)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.unit.browser import close_browser, full_page_screenshot, missing, open_browser  # noqa: E402

if __name__ == "__main__":
    if missing():
        sys.exit(f"cannot take the screenshot: {missing()}")
    driver = open_browser()
    try:
        full_page_screenshot(driver, ROOT / "results" / "grids" / "report.html", ROOT / "results" / "grids" / "report.png")
    finally:
        close_browser(driver)
