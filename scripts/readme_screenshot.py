"""Regenerate docs/train-tab.png: the Train tab during a real `demo-cpu` run, as the README shows it.

    python scripts/readme_screenshot.py            # about two minutes on 2 CPU cores

It serves the app on a free loopback port with its home in a temp folder (so the run goes there),
presses Start with the preset as it ships, waits for the samples of step 350 and the loss curve, and
saves the page from headless Chromium (Debian's, as the browser tests use).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_studio.ui.app import launch  # noqa: E402

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
WAIT_FOR_STEP = 232  # the demo preset samples every 116 steps; by step 232 the style shows at strength 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    out = ROOT / "docs" / "train-tab.png"
    port = free_port()
    os.environ["LORA_STUDIO_HOME"] = tempfile.mkdtemp(prefix="lora-studio-screenshot-")
    app = launch(port=port, open_browser=False, block=False)
    try:
        take_screenshot(port, out)
    finally:
        app.close()
    print(f"wrote {out}")


def take_screenshot(port: int, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-start").click()
        page.wait_for_function(
            "Number(document.querySelector('#train-progressbar').getAttribute('aria-valuenow')) >= "
            f"{WAIT_FOR_STEP + 5}",
            timeout=600_000,
        )
        page.locator("#train-samples .thumbnail-item").first.wait_for(timeout=60_000)
        page.screenshot(path=str(out), full_page=True)
        page.locator("#train-stop").click()
        page.wait_for_function("document.querySelector('#train-status').innerText.includes('stopped')",
                               timeout=120_000)  # fmt: skip
        browser.close()


if __name__ == "__main__":
    main()
