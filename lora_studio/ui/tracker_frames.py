"""The page's idle CPU: Gradio's status-tracker animation loop, slowed from 60 frames a second to 4.

Gradio 6's StatusTracker (the "Loading..." overlay and every component's progress badge) draws its elapsed-time
timer with a requestAnimationFrame loop that stops only when its status leaves "pending". The overlay shown while
the page loads is removed while still pending, so its loop never stops: every Gradio page, even an empty one,
asks for a frame 60 times a second for as long as it is open (Gradio 6.31: 300 frame requests in 5 s, all from
the tracker). bench/page_idle.py (headless Chromium, 20 s a tab, medians): this app's page at rest on the Dataset
tab takes 7.2% of a core for the browser, 2.3% with the tracker at 4 frames a second; the Train tab (a poll a
second) 10.9% against 7.8%. Single tries: 2.7% at 10 frames a second, 0.1-0.2% with the loop stopped. A page left
open beside a CPU training competes with it for the cores (README, "From the app"), and on a laptop it is battery
spent on nothing.

The fix is a script that runs before Gradio's modules, since the tracker keeps the `window.requestAnimationFrame`
it found when its module loaded (Gradio's `head` option is added later, too late). It passes every request for a
frame straight through, except those made from the status tracker's module (its file name in the call stack),
which it delays to TRACKER_FRAMES_PER_SECOND. A pending event's timer (tenths of a second) then moves 4 times a
second instead of 60; stopping the loop outright would need to tell the leaked loop from a live one, which the
page does not show. If a later Gradio renames that module, the script does nothing and
tests/test_tracker_frames.py fails (an idle page back at 60 frames a second); if it fixes the leak, the test
still passes and this module can go.

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
    const later = () => waiting.set(id, {{frame: frame((time) => {{ waiting.delete(id); callback(time); }})}});
    waiting.set(id, {{timer: setTimeout(later, {1000 // TRACKER_FRAMES_PER_SECOND})}});
    return id;
  }};
  window.cancelAnimationFrame = function (id) {{
    const entry = waiting.get(id);
    if (entry === undefined) return cancel(id);
    waiting.delete(id);
    if (entry.timer !== undefined) clearTimeout(entry.timer);
    if (entry.frame !== undefined) cancel(entry.frame);
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

