"""Screenshots of a run's report for the README: `python scripts/screenshots.py RUN docs/`.

Uses Debian's chromium through Playwright (no browser download). Writes `demo-report.png` (the
top of the page) and `demo-target.png` (the first target with its first facet highlighted).
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(run: str, out: str) -> None:
    page_url = (Path(run).resolve() / "index.html").as_uri()
    Path(out).mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(page_url)
        page.wait_for_load_state("load")
        page.screenshot(path=str(Path(out) / "demo-report.png"))
        target = page.locator("section.target").first
        target.locator("article.facet").first.click()
        target.scroll_into_view_if_needed()
        target.screenshot(path=str(Path(out) / "demo-target.png"))
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
