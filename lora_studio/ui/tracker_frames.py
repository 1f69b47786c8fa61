"""The page's idle CPU: Gradio's status-tracker animation loop, run from a timer 4 times a second instead of
drawing 60 frames a second.

Gradio 6's StatusTracker (the "Loading..." overlay and every component's progress badge) draws its elapsed-time
timer with a requestAnimationFrame loop that stops only when its status leaves "pending". The overlay shown while
the page loads is removed while still pending, so its loop never stops: every Gradio page, even an empty one,
asks for a frame 60 times a second for as long as it is open (Gradio 6.31: 300 frame requests in 5 s, all from
the tracker). A page left open beside a CPU training competes with it for the cores (README, "From the app"), and
on a laptop it is battery spent on nothing.

The fix is a script that runs before Gradio's modules, since the tracker keeps the `window.requestAnimationFrame`
it found when its module loaded (Gradio's `head` option is added later, too late). It passes every request for a
frame straight through, except those made from the status tracker's module (its file name in the call stack):
their callbacks run from a timer, TRACKER_FRAMES_PER_SECOND times a second, and the browser is asked for no
frame at all. The leaked loop then costs a timer callback that changes nothing on the page, so nothing is drawn;
a live tracker's timer (tenths of a second) moves 4 times a second, drawn in the next frame as any change to the
page is. Telling the leaked loop from a live one is not possible from the page (hidden trackers have the same
DOM), hence a timer for both.

Measured with bench/page_idle.py (headless Chromium, 20 s a tab, 3 rounds alternating, medians;
bench/results/page_idle_cpu.json): the page at rest on the Dataset tab takes 1.1% of a core for the browser
against 6.3% as Gradio comes; the Train tab (a poll a second) 5.1% against 9.4%. The first version of this script
(session 24) delayed the tracker's frames to 4 a second but still drew them: side by side (2 rounds) the Dataset
tab took 1.07% with it and 0.34% with the timer, the Train tab 7.2% and 6.4%.

If a later Gradio renames that module, the script does nothing and tests/test_tracker_frames.py fails (an idle
page back at 60 frames a second); if it fixes the leak, the test still passes and this module can go.

`TrackerFrames` (ASGI middleware) puts the script first in the <head> of the app's page.
"""

from __future__ import annotations

TRACKER_FRAMES_PER_SECOND = 4
TRACKER_MODULE_MARK = "/statustracker-"  # Gradio's built chunk: assets/statustracker-<hash>.js

SCRIPT = f"""<script>(() => {{
  // LoRA Studio (lora_studio/ui/tracker_frames.py): Gradio's status tracker asks for frames at most
  // {TRACKER_FRAMES_PER_SECOND} times a second; its loading overlay's loop never stops otherwise.
  const frame = window.requestAnimationFrame.bind(window);
  const cancel = window.cancelAnimationFrame.bind(window);
  const waiting = new Map();
  let lastId = 0;
  window.requestAnimationFrame = function (callback) {{
    if (!(new Error().stack || "").includes("{TRACKER_MODULE_MARK}")) return frame(callback);
    const id = --lastId;  // negative: never one of the browser's ids
    // From a timer, not a frame: a leaked loop then draws nothing, and a live tracker's change to the page is
    // drawn in the next frame as any change is. The tracker reads performance.now(), as rAF's time is.
    waiting.set(id, setTimeout(() => {{ waiting.delete(id); callback(performance.now()); }},
                               {1000 // TRACKER_FRAMES_PER_SECOND}));
    return id;
  }};
  window.cancelAnimationFrame = function (id) {{
    if (!waiting.has(id)) return cancel(id);
    clearTimeout(waiting.get(id));
    waiting.delete(id);
  }};
}})();</script>"""
SCRIPT_BYTES = SCRIPT.encode()
HEAD = b"<head>"
PAGE_PATHS = ("/", "")


def with_script(html: bytes) -> bytes:
    """The page with SCRIPT first in its <head> (unchanged when it has none)."""
    at = html.find(HEAD)
    return html if at < 0 else html[: at + len(HEAD)] + SCRIPT_BYTES + html[at + len(HEAD) :]


class TrackerFrames:
    """ASGI middleware: the app's page, when it is uncompressed HTML, gets SCRIPT at the top of its <head>. It
    sits inside Gradio's compression (Gradio adds that middleware later, which makes it the outer one)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        # Only the app's one page: a file the app serves (an .html in a run folder, say) is passed through as is,
        # never held whole in memory. A HEAD answer keeps Gradio's length.
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path") not in PAGE_PATHS:
            return await self.app(scope, receive, send)
        start: dict | None = None
        body = bytearray()

        async def rewrite(message):
            nonlocal start
            if message["type"] == "http.response.start":
                if is_plain_html(message):
                    start = message  # held until the whole body is here: its length changes
                    return
                return await send(message)
            if message["type"] != "http.response.body" or start is None:
                return await send(message)
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            page = with_script(bytes(body))
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        return await self.app(scope, receive, rewrite)


def is_plain_html(start: dict) -> bool:
    headers = {k.lower(): v for k, v in start["headers"]}
    return (
        start["status"] == 200
        and headers.get(b"content-type", b"").startswith(b"text/html")
        and b"content-encoding" not in headers
    )
