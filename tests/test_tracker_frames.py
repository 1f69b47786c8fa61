"""The page at rest: Gradio's status tracker gets its animation callbacks TRACKER_FRAMES_PER_SECOND times a second
from a timer and asks the browser for no frames (its loading overlay's animation loop otherwise draws 60 frames a
second for as long as the page is open), and the Train tab polls seldom while nothing trains."""

import functools
import time

import httpx
import pytest
from test_app import app_page, browser_page, free_port  # noqa: F401 (a fixture)

from lora_studio.ui import train_tab
from lora_studio.ui.app import launch
from lora_studio.ui.tracker_frames import SCRIPT, TRACKER_FRAMES_PER_SECOND, with_script
from lora_studio.ui.train_tab import poll


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


# A stand-in for Gradio's tracker module: a loop like its timer's (`ze()`), and one request it cancels at once.
TRACKER_STAND_IN = """const ask = window.requestAnimationFrame;
window.trackerCalls = []; window.cancelledRan = false;
const loop = () => ask((time) => { window.trackerCalls.push(time); loop(); });
loop();
window.cancelAnimationFrame(ask(() => { window.cancelledRan = true; }));"""
OTHER_MODULE = (
    "window.otherFrames = 0; const next = () => requestAnimationFrame(() => { otherFrames++; next(); }); next();"
)
STAND_IN_PAGE = (b"<!doctype html><html><head><script type=module src=/assets/statustracker-Ab1.js></script>"
                 b"<script type=module src=/assets/index-Cd2.js></script></head><body></body></html>")  # fmt: skip


@pytest.mark.browser
def test_the_tracker_s_loop_runs_from_a_timer_and_other_frames_pass(browser_page):  # noqa: F811 (the fixture)
    served = {
        "/": (with_script(STAND_IN_PAGE), "text/html"),
        "/assets/statustracker-Ab1.js": (TRACKER_STAND_IN, "text/javascript"),
        "/assets/index-Cd2.js": (OTHER_MODULE, "text/javascript"),
    }

    def serve(route):
        body, content_type = served[route.request.url.removeprefix("http://page.test")]
        route.fulfill(body=body, content_type=content_type)

    browser_page.route("http://page.test/**", serve)
    browser_page.add_init_script(COUNT_FRAMES)
    browser_page.goto("http://page.test/", wait_until="load")
    browser_page.wait_for_function("() => window.trackerCalls.length > 0")
    start = browser_page.evaluate("() => [window.trackerCalls.length, window.frameRequests, window.otherFrames]")
    time.sleep(2)
    calls, frames, other = browser_page.evaluate(
        "() => [window.trackerCalls.length, window.frameRequests, window.otherFrames]"
    )
    tracker_rate = (calls - start[0]) / 2
    assert TRACKER_FRAMES_PER_SECOND / 2 <= tracker_rate <= TRACKER_FRAMES_PER_SECOND + 1, tracker_rate
    # every frame the browser was asked for is the other module's: the tracker's loop asked for none
    assert frames - start[1] == other - start[2] > 30  # and those ran at the browser's frame rate
    times = browser_page.evaluate("() => window.trackerCalls")
    assert times == sorted(times) and times[-1] <= browser_page.evaluate("() => performance.now()")
    assert not browser_page.evaluate("() => window.cancelledRan")


TRACKER_TIMES = """() => Array.from(document.querySelectorAll('#preview-image .progress-text'),
  (e) => e.innerText).join()"""


@pytest.mark.browser
def test_an_idle_page_asks_for_no_frames_polls_seldom_and_a_pending_event_s_timer_runs(
    browser_page, app_state, monkeypatch  # noqa: F811 (the fixture)
):
    # Installed before the page's own scripts, so it counts the requests that reach the browser. Without
    # tracker_frames an idle Gradio page asks for 60 a second for as long as it is open (the status tracker's
    # leaked loop); with it, once the page's opening transitions are over (5-6 s), none.
    browser_page.add_init_script(COUNT_FRAMES)
    polls = []  # the Train tab's polls (its timer ticks while the tab is shown) reach the server: counted there

    @functools.wraps(poll)  # Gradio reads the signature (a bare *args one drew "Expected 0 arguments" warnings)
    def counted_poll(*args, **kwargs):
        polls.append(time.monotonic())
        return poll(*args, **kwargs)

    monkeypatch.setattr(train_tab, "poll", counted_poll)  # before the app is built, which binds it
    rates = []
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Train").click()
        opened = time.monotonic()
        while len(rates) < 15 and (not rates or rates[-1] > 0.5 or len(rates) < 4):
            page.evaluate("() => { window.frameRequests = 0 }")
            time.sleep(2)
            rates.append(page.evaluate("() => window.frameRequests") / 2)
        assert rates[-1] <= 0.5, f"frame requests a second, every 2 s: {rates}"
        # Nothing trains: a poll as the page loads and as the tab opens, then one every IDLE_POLL_SECONDS (it was
        # every second).
        idle_for = time.monotonic() - opened
        assert 1 <= len(polls) <= 3 + idle_for / train_tab.IDLE_POLL_SECONDS, (len(polls), idle_for)  # 1 s: 8 in 8 s
        # A live tracker still counts: a preview of 60 steps shows "processing | 0.3s", "0.5s", ... while it runs.
        page.get_by_role("tab", name="Preview").click()
        page.locator("#preview-steps input[type=number]").fill("60")
        page.locator("#preview-generate").click()
        shown = set()
        for _ in range(20):
            shown.add(page.evaluate(TRACKER_TIMES))
            time.sleep(0.1)
        assert len({text for text in shown if "s" in text}) >= 3, shown


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
