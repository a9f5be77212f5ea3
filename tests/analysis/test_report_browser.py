"""The report in a real headless browser: Debian's Chromium, driven by Playwright.

Playwright never downloads a browser here; it drives the system's ``/usr/bin/chromium``
(``apt-get install chromium``, as ``make test`` does when it may). Without Chromium or
Playwright these tests fail, saying what is missing, unless ``CXRTUNE_ALLOW_NO_BROWSER=1``
lets them skip; pytest's summary then names the reason.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cxrtune.analysis.report import write_report
from tests.analysis.test_report import make_report_experiment

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_browser() -> None:
    """Fail when the browser or its driver is missing, unless the user allowed a skip."""
    missing = None
    if not CHROMIUM.is_file():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "Playwright is missing (pip install -e '.[dev]')"
    if missing is None:
        return
    if os.environ.get("CXRTUNE_ALLOW_NO_BROWSER") == "1":
        pytest.skip(f"browser tests skipped (CXRTUNE_ALLOW_NO_BROWSER=1): {missing}")
    pytest.fail(
        f"the report's browser test needs a browser: {missing}; "
        "or set CXRTUNE_ALLOW_NO_BROWSER=1 to skip it"
    )


@dataclass
class LoadedReport:
    """The report as the browser loaded it, and what the browser said while loading it."""

    path: Path
    page: Any  # playwright.sync_api.Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedReport]:
    require_browser()
    from playwright.sync_api import sync_playwright

    path = write_report(make_report_experiment(tmp_path_factory.mktemp("browser")))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            report = LoadedReport(path=path, page=page)
            page.on(
                "console",
                lambda message: (
                    report.errors.append(f"console: {message.text}")
                    if message.type == "error"
                    else None
                ),
            )
            page.on("pageerror", lambda error: report.errors.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: report.errors.append(f"failed: {request.url}"))
            page.on("request", lambda request: report.requests.append(request.url))
            page.goto(path.as_uri(), wait_until="load")
            yield report
        finally:
            browser.close()


def test_the_report_loads_from_a_file_without_errors_or_outside_requests(
    loaded: LoadedReport,
) -> None:
    assert loaded.errors == []
    assert loaded.page.title() == f"cxrtune report: {loaded.path.parent.parent.name}"
    outside = [url for url in loaded.requests if not url.startswith("data:")]
    assert outside == [loaded.path.as_uri()]


def test_every_image_is_loaded(loaded: LoadedReport) -> None:
    widths = loaded.page.eval_on_selector_all(
        "img", "images => images.map(image => image.complete ? image.naturalWidth : 0)"
    )
    assert len(widths) == len(list(loaded.path.parent.glob("*.png")))
    assert all(width > 0 for width in widths), widths


def test_every_figure_shows_more_than_one_colour_on_screen(loaded: LoadedReport) -> None:
    # Each image's content box in page coordinates: its border, if styled, would be a second
    # colour on any image, blank or not.
    boxes = loaded.page.eval_on_selector_all(
        "figure img",
        """images => images.map(image => {
            const box = image.getBoundingClientRect();
            return {alt: image.alt, x: box.left + image.clientLeft + window.scrollX,
                    y: box.top + image.clientTop + window.scrollY,
                    width: image.clientWidth, height: image.clientHeight};
        })""",
    )
    assert len(boxes) == len(list(loaded.path.parent.glob("*.png")))
    for box in boxes:
        clip = {name: box[name] for name in ("x", "y", "width", "height")}
        shot = Image.open(io.BytesIO(loaded.page.screenshot(clip=clip, full_page=True)))
        # One colour everywhere means every channel's lowest value is also its highest.
        assert any(low != high for low, high in shot.convert("RGB").getextrema()), box["alt"]


def test_a_missing_browser_fails_the_run_unless_a_skip_is_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CXRTUNE_ALLOW_NO_BROWSER", raising=False)
    with pytest.raises(pytest.fail.Exception, match="CXRTUNE_ALLOW_NO_BROWSER=1"):
        require_browser()
    monkeypatch.setenv("CXRTUNE_ALLOW_NO_BROWSER", "1")
    with pytest.raises(pytest.skip.Exception, match="no-chromium is missing"):
        require_browser()


def test_the_summary_numbers_are_visible_without_scrolling_at_1280_by_800(
    loaded: LoadedReport,
) -> None:
    page = loaded.page
    page.set_viewport_size({"width": 1280, "height": 800})
    page.evaluate("window.scrollTo(0, 0)")
    cells = page.eval_on_selector_all(
        "#summary td",
        """cells => cells.map(cell => {
            const box = cell.getBoundingClientRect();
            return {text: cell.innerText, right: box.right, bottom: box.bottom};
        })""",
    )
    numbers = [cell for cell in cells if any(ch.isdigit() for ch in cell["text"])]
    assert any("(" in cell["text"] for cell in numbers), cells  # a test figure with its interval
    hidden = [cell for cell in numbers if cell["right"] > 1280 or cell["bottom"] > 800]
    assert not hidden, hidden
    page.set_viewport_size({"width": 1280, "height": 900})
