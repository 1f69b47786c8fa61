"""What stands between the network and the app's handlers: Host and Origin checks, and login backoff.

- DNS rebinding: a page on evil.example can make the browser resolve that name to 127.0.0.1 and talk to
  the app as if it were same-origin. Such requests still carry `Host: evil.example`, so while the app
  listens on loopback, any Host but 127.0.0.1 / localhost / [::1] (with the port) is answered 403.
- Cross-site requests: a page elsewhere can POST to the app (a form upload needs no CORS preflight).
  Requests that change something (POST, PUT, PATCH, DELETE) whose `Origin` is not the app's own are 403.
- Request bodies: every request that changes something, but an upload, declares its length, of at most
  MAX_REQUEST_BYTES (413 or 411 otherwise, before the app reads a byte). Gradio reads a JSON body whole: one
  300 MB request took the app from 0.16 to 1.1 GB of memory, which it kept, beside a training. Uploads go to
  Gradio's upload route, which streams them to disk and caps each file (--max-upload-mb).
- Passwords (with --listen): failed logins are answered ever more slowly, one at a time, so guessing is
  slow whatever the number of parallel attempts.
"""

from __future__ import annotations

import asyncio
import hmac
from urllib.parse import urlsplit

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
# The largest request a page sends is a Dataset-tab click carrying the gallery: 500 images (dataset_tab.MAX_GALLERY)
# with a caption of up to 64 KB each as labels, 32 MB at worst. Everything else is a few KB.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
UPLOAD_ROUTE = "/gradio_api/upload"  # multipart, streamed to disk by Gradio, each file capped by --max-upload-mb


def split_host(value: str) -> tuple[str, str]:
    """'Host' header or netloc -> (host in lower case, port or ''), IPv6 brackets kept."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value.partition("]")
        return host + "]", rest.removeprefix(":")
    host, _, port = value.partition(":")
    return host, port


class RequestGuard:
    """ASGI middleware: Host check on loopback, same-origin check and body cap for requests that change
    something."""

    def __init__(self, app, loopback: bool, port: int | None = None):
        self.app, self.loopback, self.port = app, loopback, port

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        reason = self.refusal(scope, headers)
        if reason is not None and scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if reason is not None:
            return await answer(send, 403, reason)
        if scope["type"] == "http":
            status_and_reason = body_refusal(scope, headers)
            if status_and_reason is not None:
                return await answer(send, *status_and_reason)
        return await self.app(scope, receive, send)

    def refusal(self, scope, headers: dict[str, str]) -> str | None:
        host = headers.get("host", "")
        if self.loopback and not self.host_allowed(host):
            return (
                f"Refused: LoRA Studio answers only to 127.0.0.1, localhost or [::1] on this machine, not {host!r} "
                "(a web page may be trying to reach it); open http://127.0.0.1 instead."
            )
        origin = headers.get("origin")
        if origin is not None and (scope.get("method") in CHANGING or scope["type"] == "websocket"):
            if not self.same_origin(origin, host):
                return f"Refused: a request from {origin!r} may not change anything in LoRA Studio."
        return None

    def host_allowed(self, host: str) -> bool:
        name, port = split_host(host)
        return name in LOOPBACK_HOSTS and (not port or self.port is None or port == str(self.port))

    @staticmethod
    def same_origin(origin: str, host: str) -> bool:
        if origin == "null":
            return False
        netloc = urlsplit(origin).netloc
        return bool(netloc) and split_host(netloc) == split_host(host)


def body_refusal(scope, headers: dict[str, str]) -> tuple[int, str] | None:
    """(status, sentence) for a request whose body is too large or of unknown length, else None."""
    if scope.get("method") not in CHANGING or scope.get("path", "").endswith(UPLOAD_ROUTE):
        return None
    if "transfer-encoding" in headers:  # a streamed body: its size is known only once it has all been read
        return 411, "Refused: a request to LoRA Studio must declare its length (Content-Length), not stream it."
    declared = headers.get("content-length", "0").strip()
    if not declared.isdigit() or int(declared) > MAX_REQUEST_BYTES:
        return 413, (f"Refused: a request to LoRA Studio may carry at most {MAX_REQUEST_BYTES // 2**20} MB, "
                     f"this one declares {declared[:20]!r} bytes; files go through the upload route.")  # fmt: skip
    return None


async def answer(send, status: int, sentence: str) -> None:
    """A plain-text answer, sent before the app sees the request."""
    body = sentence.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class LoginThrottle:
    """Gradio's `auth` (pass `.check`, a coroutine function: Gradio awaits only those, and would take the
    coroutine object an `async __call__` returns as a yes). Checks one attempt at a time, and after each
    failure the next answer waits longer (0.25 s doubling, at most 8 s); a success resets it."""

    def __init__(self, user: str, password: str, base_delay: float = 0.25, max_delay: float = 8.0):
        self.user, self.password = user, password
        self.base_delay, self.max_delay = base_delay, max_delay
        self.failures = 0
        self._one_at_a_time: asyncio.Lock | None = None

    def delay(self) -> float:
        return 0.0 if not self.failures else min(self.base_delay * 2 ** (self.failures - 1), self.max_delay)

    async def check(self, username: str, password: str) -> bool:
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        async with self._one_at_a_time:
            await asyncio.sleep(self.delay())
            ok = hmac.compare_digest(username.encode(), self.user.encode()) & hmac.compare_digest(
                password.encode(), self.password.encode()
            )
            self.failures = 0 if ok else self.failures + 1
            return ok
