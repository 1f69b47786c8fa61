"""A small client of Gradio's own HTTP protocol, for tests that attack a running app as a web page could.

It speaks the protocols the page itself uses (POST /gradio_api/queue/join, then the event stream of
/gradio_api/queue/data; POST /gradio_api/run/<api_name> for events outside the queue) with any payload, any Host
or Origin header, and event data (a table row selected), none of which gradio_client lets a test choose.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx


class GradioHTTP:
    def __init__(self, base_url: str, headers: dict | None = None):
        self.base = base_url.rstrip("/")
        self.http = httpx.Client(headers=headers or {}, timeout=120)
        self._config: dict | None = None

    def config(self) -> dict:
        if self._config is None:
            response = self.http.get(f"{self.base}/config")
            response.raise_for_status()
            self._config = response.json()
        return self._config

    def dependency(self, api_name: str) -> tuple[int, dict]:
        for index, dep in enumerate(self.config()["dependencies"]):
            if dep.get("api_name") == api_name:
                return index, dep
        raise KeyError(f"no endpoint {api_name!r}")

    def call(self, api_name: str, data: list, session: str = "attacker", event_data=None) -> tuple[bool, object]:
        """(True, outputs) or (False, the error message the page would show). Sent as the page sends it: through
        the queue, or straight to /gradio_api/run/ for an event that skips it (`queue=False`)."""
        index, dep = self.dependency(api_name)
        if dep.get("queue") is False:
            response = self.call_direct(api_name, data, session, event_data=event_data)
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            if response.status_code == 200 and "data" in body:
                return True, body["data"]
            return False, body.get("error") or f"HTTP {response.status_code}: {response.text}"
        payload = {"data": data, "fn_index": index, "session_hash": session, "event_data": event_data,
                   "trigger_id": dep["targets"][0][0] if dep.get("targets") else None}  # fmt: skip
        joined = self.http.post(f"{self.base}/gradio_api/queue/join", json=payload)
        if joined.status_code != 200:
            return False, f"HTTP {joined.status_code}: {joined.text}"
        event_id = joined.json()["event_id"]
        with self.http.stream("GET", f"{self.base}/gradio_api/queue/data", params={"session_hash": session}) as s:
            for line in s.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") == event_id and message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    if message.get("success"):
                        return True, output.get("data")
                    return False, output.get("error") or str(output)
        return False, "the event stream ended without a result"

    def call_direct(self, api_name: str, data: list, session: str = "attacker", headers: dict | None = None,
                    event_data=None) -> httpx.Response:  # fmt: skip
        """An event outside the queue (`queue=False`), as the page sends it: POST /gradio_api/run/<api_name>."""
        payload = {"data": data, "session_hash": session, "event_data": event_data}
        return self.http.post(f"{self.base}/gradio_api/run/{api_name}", json=payload, headers=headers or {})

    def upload(self, path: Path, headers: dict | None = None) -> httpx.Response:
        with open(path, "rb") as f:
            return self.http.post(f"{self.base}/gradio_api/upload", files={"files": (path.name, f)},
                                  headers=headers or {})  # fmt: skip

    @staticmethod
    def file_data(server_path: str, name: str | None = None) -> dict:
        return {"path": server_path, "orig_name": name or Path(server_path).name, "meta": {"_type": "gradio.FileData"}}
