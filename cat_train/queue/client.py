"""ComfyUI's HTTP API as `queue` needs it: JSON in and out, a GET retried before its server counts as down,
ComfyUI's own explanation when it refuses a workflow."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .errors import QueueError, ServerDown

RETRY_DELAYS = (0.5, 1.0, 2.0)  # a failed GET is retried after these pauses before its server counts as down


def server_url(text: str) -> str:
    """http(s)://host[:port] with no trailing slash; anything else is refused before any connection."""
    text = text.strip()
    if "://" not in text:
        text = "http://" + text
    u = urllib.parse.urlsplit(text)
    text = text.rstrip("/")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise QueueError(f"--server {text!r} is not an http:// or https:// URL of a ComfyUI server "
                         "(e.g. http://127.0.0.1:8188).")
    try:
        _ = u.port  # urlsplit checks the port only when asked
    except ValueError:
        raise QueueError(f"--server {text!r} has an invalid port.") from None
    return text



def _describe_http_error(path: str, code: int, payload) -> str:
    if isinstance(payload, dict) and "error" in payload:
        err = payload["error"]
        lines = [f"ComfyUI refused the workflow ({code}): {err.get('message', err) if isinstance(err, dict) else err}"
                 + (f" - {err.get('details')}" if isinstance(err, dict) and err.get("details") else "")]
        for nid, ne in (payload.get("node_errors") or {}).items():
            for e in ne.get("errors", []):
                lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        return "\n".join(lines)
    return f"ComfyUI answered {code} on {path}: {payload}"


class Client:
    def __init__(self, server: str, timeout: float = 30.0, client_id: str | None = None):
        self.base = server_url(server)
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex

    def _req(self, path: str, body: dict | None = None, retry: bool = True, timeout: float | None = None):
        """JSON of one request. A GET that fails to connect, times out or gets a 5xx is retried (RETRY_DELAYS)
        before ServerDown; a POST is not (it may have landed). 4xx: QueueError with ComfyUI's explanation."""
        data = json.dumps(body).encode() if body is not None else None
        delays = RETRY_DELAYS if retry and body is None else ()
        for attempt in range(len(delays) + 1):
            req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                    raw = r.read()
                    try:
                        return json.loads(raw or b"null")
                    except ValueError:
                        return None  # /interrupt and POST /queue answer 200 with no JSON
            except urllib.error.HTTPError as e:
                payload = e.read().decode(errors="replace")
                try:
                    payload = json.loads(payload)
                except ValueError:
                    pass
                if e.code < 500:
                    raise QueueError(_describe_http_error(path, e.code, payload)) from None
                problem = f"HTTP {e.code} on {path}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                problem = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt < len(delays):
                time.sleep(delays[attempt])
        raise ServerDown(f"cannot reach ComfyUI at {self.base} ({problem}); start it, e.g. "
                         "`python main.py --listen 127.0.0.1 --port 8188`, or pass --server URL.")

    def object_info(self) -> dict:
        return self._req("/object_info")

    def post(self, graph: dict, prompt_id: str | None = None) -> str:
        body = {"prompt": graph, "client_id": self.client_id}
        if prompt_id:  # our own id: known even when the answer to the post is lost
            body["prompt_id"] = prompt_id
        return self._req("/prompt", body)["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self._req(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)

    def queue(self, retry: bool = True, timeout: float | None = None) -> dict:
        """{'queue_running': [...], 'queue_pending': [...]}; items are [number, prompt_id, prompt, extra_data, ...]."""
        return self._req("/queue", retry=retry, timeout=timeout) or {}

    def queue_state(self, prompt_id: str) -> str | None:
        """'running', 'pending' or None (not queued)."""
        return state_in(self.queue(), prompt_id)

    def interrupt(self, prompt_id: str) -> None:
        """ComfyUI >= 0.3.4x interrupts only when this prompt is the one running (an older server ignores the id
        and interrupts whatever runs, which is why cancel() asks /queue first)."""
        self._req("/interrupt", {"prompt_id": prompt_id})

    def delete(self, prompt_ids: list[str]) -> None:
        self._req("/queue", {"delete": prompt_ids})


def state_in(q: dict, prompt_id: str) -> str | None:
    for state in ("running", "pending"):
        if any(len(item) > 1 and item[1] == prompt_id for item in q.get(f"queue_{state}", [])):
            return state
    return None

