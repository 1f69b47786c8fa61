"""Gradio's status tracker asks for frames at most TRACKER_FRAMES_PER_SECOND times a second (its loading overlay's
animation loop otherwise runs at 60 frames a second for as long as the page is open)."""

import time

import httpx
import pytest
from test_app import app_page, browser_page, free_port  # noqa: F401 (a fixture)

from lora_studio.ui.app import launch
from lora_studio.ui.tracker_frames import SCRIPT, TRACKER_FRAMES_PER_SECOND, with_script


def test_the_script_goes_first_in_the_head():
    page = b"<!doctype html><html><head><meta charset='utf-8'><script type=module src=x.js></script></head></html>"
    changed = with_script(page)
    assert changed.startswith(b"<!doctype html><html><head>" + SCRIPT.encode() + b"<meta charset='utf-8'>")
    assert changed.replace(SCRIPT.encode(), b"") == page
    assert with_script(b"<p>no head</p>") == b"<p>no head</p>"


def test_the_app_serves_its_page_with_the_script_and_leaves_other_answers_alone(app_state):
    port = free_port()
    app = launch(port=port, open_browser=False, block=False)
    try:
        base = f"http://127.0.0.1:{port}"
        plain = httpx.get(f"{base}/", headers={"accept-encoding": "identity"})
        assert plain.status_code == 200 and int(plain.headers["content-length"]) == len(plain.content)
        head = plain.text.split("<head>", 1)[1]
        assert head.startswith(SCRIPT)  # before Gradio's own scripts and modules
        assert plain.text.count(SCRIPT) == 1
        config = httpx.get(f"{base}/config", headers={"accept-encoding": "identity"})
        assert config.status_code == 200 and SCRIPT not in config.text and config.json()["components"]
    finally:
        app.close()


COUNT_FRAMES = """(() => { window.frameRequests = 0; const ask = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => { window.frameRequests++; return ask(callback); }; })()"""


@pytest.mark.browser
def test_an_idle_page_asks_for_few_frames(browser_page, app_state):  # noqa: F811 (the fixture)
    # Installed before the page's own scripts, so it counts the requests that reach the browser. Without
    # tracker_frames an idle Gradio page asks for 60 a second for as long as it is open (the status tracker's
    # leaked loop); with it, once the page's opening transitions are over (5-6 s), 4 a second.
    browser_page.add_init_script(COUNT_FRAMES)
    rates = []
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Dataset").wait_for(timeout=60_000)
        while len(rates) < 15 and (not rates or rates[-1] > TRACKER_FRAMES_PER_SECOND + 1):
            page.evaluate("() => { window.frameRequests = 0 }")
            time.sleep(2)
            rates.append(page.evaluate("() => window.frameRequests") / 2)
    assert rates[-1] <= TRACKER_FRAMES_PER_SECOND + 1, f"frame requests a second, every 2 s: {rates}"


@pytest.mark.slow  # 13 s for the app's start in a subprocess; it guards a benchmark, not the app
def test_the_bench_baseline_serves_the_page_as_gradio_does(bench_script, tmp_path):
    # bench/page_idle.py's "without" case: the same app with the insertion made a no-op (its figures compare
    # the two, so this side must really lack the script and still be the app)
    page_idle = bench_script("page_idle")
    process, url = page_idle.serve("without", str(tmp_path))
    try:
        page = httpx.get(url, headers={"accept-encoding": "identity"})
        assert page.status_code == 200 and "tracker_frames" not in page.text and "gradio_config" in page.text
    finally:
        process.terminate()
        process.wait(timeout=30)
