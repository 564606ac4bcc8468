"""ComfyUI's HTTP API as `queue` needs it: JSON in and out, a GET retried before its server counts as down,
ComfyUI's own explanation when it refuses a workflow."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .errors import QueueError, ServerDown, ServerError

RETRY_DELAYS = (0.5, 1.0, 2.0)  # a failed GET is retried after these pauses before its server counts as down
REQUEST_TIMEOUT = 30.0  # seconds a request waits for its answer, unless --timeout is shorter


EXAMPLE_URL = "http://127.0.0.1:8188"
_HOST = re.compile(r"^[A-Za-z0-9._~%-]+$")  # a name or an IPv4 address; IPv6 comes in brackets


def server_url(text: str, where: str = "--server") -> str:
    """http(s)://host[:port] with no trailing slash; anything else is refused before any connection, naming `where`
    the text came from (--server, or a --server-file line) and what a URL there looks like."""
    text = text.strip()
    shown = f"{where} {text!r}"
    if not text:
        raise QueueError(f"{where} is empty: give a ComfyUI server's URL, e.g. {EXAMPLE_URL}.")
    if not text.isprintable():
        raise QueueError(f"{shown} holds characters that are not text (control characters or a byte-order mark): "
                         f"write the URL as plain text, e.g. {EXAMPLE_URL}.")
    words = text.split()
    if len(words) > 1:
        if sum("://" in w for w in words) > 1:
            raise QueueError(f"{shown} holds {len(words)} URLs: give one URL per --server, or one a line in a "
                             "--server-file.")
        raise QueueError(f"{shown} has spaces in it, so it is not a URL: give a ComfyUI server's URL, e.g. "
                         f"{EXAMPLE_URL}.")
    if "://" not in text:
        text = "http://" + text
    try:
        u = urllib.parse.urlsplit(text)
    except ValueError as e:  # "Invalid IPv6 URL": a bracket left open
        raise QueueError(f"{shown} is not a valid URL ({e}); an IPv6 address goes in brackets before the port, "
                         "e.g. http://[::1]:8188.") from None
    text = text.rstrip("/")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise QueueError(f"{where} {text!r} is not an http:// or https:// URL of a ComfyUI server (e.g. "
                         f"{EXAMPLE_URL}).")
    if not u.netloc.startswith("[") and not _HOST.match(u.hostname):
        raise QueueError(f"{shown}: {u.hostname!r} is not a host name or address; give a ComfyUI server's URL, "
                         f"e.g. {EXAMPLE_URL}.")
    try:
        _ = u.port  # urlsplit checks the port only when asked
    except ValueError as e:
        raise QueueError(f"{where} {text!r} has an invalid port ({e}); ComfyUI's default is 8188.") from None
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


def _excerpt(raw: bytes | str, n: int = 80) -> str:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def _timed_out(e: BaseException) -> bool:
    reason = getattr(e, "reason", e)
    return isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason)


class Client:
    """timeout: seconds one request may wait for its answer, and the time after which a failing request is not
    retried any more (the retries are for blips, not for a server that has already kept us waiting that long)."""

    def __init__(self, server: str, timeout: float = REQUEST_TIMEOUT, client_id: str | None = None):
        self.base = server_url(server)
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex

    def _req(self, path: str, body: dict | None = None, retry: bool = True, timeout: float | None = None,
             want_json: bool = True):
        """JSON of one request. A GET that fails to connect, times out or gets a 5xx is retried (RETRY_DELAYS)
        while the time spent stays under the timeout, then ServerDown (ServerError for a 5xx); a POST is not
        retried (it may have landed). 4xx: QueueError with ComfyUI's explanation. An answer that is not JSON where
        ComfyUI's API answers JSON (want_json): QueueError naming what answered instead."""
        data = json.dumps(body).encode() if body is not None else None
        method = "GET" if data is None else "POST"
        delays = RETRY_DELAYS if retry and body is None else ()
        limit = timeout or self.timeout
        t0 = time.monotonic()
        tries = 0
        for attempt in range(len(delays) + 1):
            tries += 1
            req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=limit) as r:
                    raw = r.read()
                    ctype = r.headers.get("Content-Type", "")
                try:
                    return json.loads(raw or b"null")
                except ValueError:
                    if not want_json:
                        return None  # /interrupt and POST /queue answer 200 with no JSON
                    raise QueueError(
                        f"{self.base} answered {method} {path} with {ctype.split(';')[0] or 'text'} "
                        f"({_excerpt(raw)!r}), not ComfyUI's JSON: it is not a ComfyUI server's API (a web page, a "
                        "proxy's login, another service?); pass --server with the address ComfyUI prints at start "
                        f"(\"To see the GUI go to: ...\"), e.g. {EXAMPLE_URL}.") from None
            except urllib.error.HTTPError as e:
                raw = e.read()
                payload = raw.decode(errors="replace")
                try:
                    payload = json.loads(payload)
                except ValueError:
                    pass
                if e.code < 500:
                    raise QueueError(_describe_http_error(path, e.code, payload)) from None
                kind, problem = "error", f"HTTP {e.code}" + (f": {_excerpt(raw)}" if raw.strip() else "")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                kind = "slow" if _timed_out(e) else "down"
                problem = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt < len(delays) and time.monotonic() - t0 + delays[attempt] < limit:
                time.sleep(delays[attempt])
                continue
            break
        if kind == "error":
            raise ServerError(f"ComfyUI at {self.base} answered {method} {path} with {problem}"
                              f"{f' ({tries} tries)' if tries > 1 else ''}; the server's console shows why.")
        if kind == "slow":
            raise ServerDown(f"ComfyUI at {self.base} took the connection but did not answer {method} {path} within "
                             f"{limit:g} s{f' ({tries} tries)' if tries > 1 else ''}: it is busy or stuck (a model "
                             "load, a machine out of memory); try again when it answers"
                             + (", or pass a larger --timeout." if limit < REQUEST_TIMEOUT else "."))
        raise ServerDown(f"cannot reach ComfyUI at {self.base} ({problem}); start it, e.g. "
                         "`python main.py --listen 127.0.0.1 --port 8188`, or pass --server URL.")

    def object_info(self) -> dict:
        info = self._req("/object_info")
        if not isinstance(info, dict) or not info or not all(isinstance(v, dict) for v in info.values()):
            raise QueueError(f"{self.base} answered GET /object_info with JSON that is not ComfyUI's node list "
                             f"({_excerpt(json.dumps(info))!r}): it is not a ComfyUI server's API; pass --server with "
                             f"the address ComfyUI prints at start, e.g. {EXAMPLE_URL}.")
        return info

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
        self._req("/interrupt", {"prompt_id": prompt_id}, want_json=False)

    def delete(self, prompt_ids: list[str]) -> None:
        self._req("/queue", {"delete": prompt_ids}, want_json=False)


def state_in(q: dict, prompt_id: str) -> str | None:
    for state in ("running", "pending"):
        if any(len(item) > 1 and item[1] == prompt_id for item in q.get(f"queue_{state}", [])):
            return state
    return None

