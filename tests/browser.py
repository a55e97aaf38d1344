"""Headless Chromium for the report and playground tests: Debian's /usr/bin/chromium driven by Playwright
(browser downloads are unreachable here), with the flags that keep it off the network."""

from __future__ import annotations

import contextlib
import shutil

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
HINT = "apt-get install -y chromium && pip install playwright (the test extra)"
needs_browser = [pytest.mark.requires(module="playwright", hint=HINT),
                 pytest.mark.requires(executable="chromium", hint=HINT)]


@contextlib.contextmanager
def browser_page(profile_dir):
    """(page, problems): a fresh Chromium profile in `profile_dir`; `problems` collects console errors,
    uncaught page errors and failed requests as they happen."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile_dir), executable_path=shutil.which("chromium"),
                                                   headless=True, args=FLAGS)
        try:
            page = ctx.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            yield page, problems
        finally:
            ctx.close()


def images_rendered(page) -> list[dict]:
    """[{src, width}] of every <img> on the page, width its naturalWidth (0: not rendered)."""
    return page.eval_on_selector_all("img", "els => els.map(e => ({src: e.getAttribute('src'), "
                                            "width: e.complete ? e.naturalWidth : 0}))")
