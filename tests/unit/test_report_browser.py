"""The report as a reader sees it: report.html opened in headless chromium (skipped, with the reason,
where chromium is absent). Every image decoded, every table there, no console errors."""

import re
from pathlib import Path

import pytest

from peftlab.cli import main

from .browser import close_browser, missing, open_browser, page_facts
from .test_report import store_path  # noqa: F401  (the fixture: a small store in the study's shape)

pytestmark = pytest.mark.skipif(missing() is not None, reason=f"no browser: {missing()}")
COMMITTED = Path(__file__).resolve().parents[2] / "results" / "grids" / "report.html"


@pytest.fixture(scope="module")
def browser():
    driver = open_browser()
    yield driver
    close_browser(driver)


def check_page(browser, page: Path) -> dict:
    source = page.read_text(encoding="utf-8")
    facts, errors = page_facts(browser, page)
    assert errors == []
    assert facts["images"] and len(facts["images"]) == source.count("<img")
    assert all(i["complete"] and i["width"] > 0 for i in facts["images"]), facts["images"]  # each decoded
    assert facts["tables"] == len(re.findall(r"<table\b", source)) > 0
    assert all(rows >= 2 for rows in facts["rows"])  # a header and at least one row each
    assert facts["overflow"] <= 0  # nothing wider than the window: no sideways scrolling at 1280 px
    return facts


def test_a_fresh_report_renders_with_every_image_and_table(browser, store_path, tmp_path):  # noqa: F811
    assert main(["report", str(store_path), "--out", str(tmp_path / "report")]) == 0
    facts = check_page(browser, tmp_path / "report" / "report.html")
    assert len(facts["images"]) == 4


def test_the_committed_report_renders_with_every_image_and_table(browser):
    check_page(browser, COMMITTED)


def test_a_broken_image_and_a_console_error_are_seen(browser, tmp_path):
    # The checks above could fail: an image that does not decode shows naturalWidth 0, a script error is logged.
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="data:image/png;base64,AAAA"><table><tr><td>x</td></tr></table>'
                    '<script>undefined_function()</script></body></html>')
    facts, errors = page_facts(browser, page)
    assert facts["images"][0]["width"] == 0
    assert len(errors) == 1 and "undefined_function" in errors[0]["message"]
