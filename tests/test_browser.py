"""The demo's report.html rendered by a real browser (Debian's chromium, headless, driven through
chromium-driver): no broken image, the headline there, mask overlays shown, no page wider than
the window. ``make test-browser`` installs chromium if missing and makes the demo first; not part
of the default ``make test``."""
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPORT = Path(os.environ.get("STEEL_RAY_REPORT", "runs/demo/blend/report.html"))
WINDOW = (1280, 900)
SCREENSHOT = Path(os.environ.get("STEEL_RAY_SCREENSHOT", "runs/demo/blend/report_screenshot.png"))


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("chromium and chromedriver are needed: make test-browser installs them (apt-get install chromium "
                    "chromium-driver)")
    opts = Options()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def page_problems(browser, path: Path) -> dict:
    """Open ``path`` and return what a reader would see wrong, plus what the page holds."""
    from selenium.webdriver.common.by import By

    browser.get(path.resolve().as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0, i.naturalWidth, "
        "i.className])")
    head = browser.find_elements(By.CSS_SELECTOR, "p.headline")
    scroll_w, inner_w = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    return {"broken": [alt for alt, ok, _, _ in images if not ok], "n_images": len(images),
            "overlays": [alt for alt, ok, _, cls in images if "overlay" in (cls or "")],
            "headline": head[0].text if head else "", "scroll_width": scroll_w, "window_width": inner_w,
            "title": browser.title}


def test_demo_report_renders(browser):
    if not REPORT.exists():
        pytest.fail(f"{REPORT} not found: make test-browser runs make demo first")
    got = page_problems(browser, REPORT)
    assert got["broken"] == [], got["broken"]
    assert got["headline"].startswith("Holdout") or "holdout" in got["headline"].lower(), got["headline"]
    assert len(got["overlays"]) >= 4, got  # mask overlays in the report (per class, OOF and holdout)
    assert got["scroll_width"] <= got["window_width"], got  # no page wider than the window
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(WINDOW[0], min(browser.execute_script("return document.body.scrollHeight") + 40, 16000))
    browser.save_screenshot(str(SCREENSHOT))
    browser.set_window_size(*WINDOW)
    print(f"\n{REPORT}: {got['title']!r}, {got['n_images']} images ({len(got['overlays'])} overlays), "
          f"headline {got['headline']!r}; page {got['scroll_width']} px wide in a {got['window_width']} px window; "
          f"screenshot {SCREENSHOT}")


def test_the_checks_catch_a_broken_page(browser, tmp_path):
    """A page with a broken image, no headline and a table wider than the window fails each check."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><img alt='gone' src='data:image/png;base64,AAAA'/>"
                   "<table><tr><td style='white-space:nowrap'>" + "x" * 600 + "</td></tr></table></body></html>")
    got = page_problems(browser, bad)
    assert got["broken"] == ["gone"] and got["headline"] == "" and got["scroll_width"] > got["window_width"]
