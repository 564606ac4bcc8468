"""`python -m cat_train queue WORKFLOW.api.json`: batch runs through a running ComfyUI server.

    python -m cat_train queue workflows/api/cat_sd15_train_kps.api.json --server http://127.0.0.1:8188 \
        --set CAT_Dataset.folder=my_dog --sweep CAT_LossConfig.cat_factor=0.5,1,2 --out runs.json

A sweep sets only the input it names: the LoRA and checkpoint names stay as the graph has them (the
files land as name, name_00001, ...; --out records which run wrote which). docs/batch.md shows runs
whose file names carry the swept value.

NODE is a node id ("10") or a node type that occurs once ("CAT_Dataset"). Values are JSON when they
parse (numbers, true/false) and strings otherwise. Each --sweep multiplies the runs (all combinations).
The /ws websocket is opened first (so no event of a prompt is missed, however fast it fails), then
every run is posted to /prompt and followed: progress from the websocket, the result from /history,
which is also read every second so that a missed or absent event never leaves it waiting. --timeout
(default 600 s) gives up on a run that shows no progress for that long. Where each output landed is
printed and written to --out. Only the standard library is needed.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import itertools
import json
import os
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class QueueError(RuntimeError):
    pass


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assign(text: str, sweep: bool) -> tuple[str, str, list]:
    target, eq, value = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not eq or not dot or not node or not name:
        raise QueueError(f"override {text!r} must look like NODE.input=value (NODE: a node id or a node type).")
    values = [parse_value(v) for v in value.split(",")] if sweep else [parse_value(value)]
    return node, name, values


def resolve_node(graph: dict, node: str) -> str:
    if node in graph:
        return node
    hits = [k for k, v in graph.items() if v.get("class_type") == node]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise QueueError(f"node type {node!r} occurs {len(hits)} times (ids {', '.join(hits)}); name the node by id.")
    listing = ", ".join(f"{k} ({v.get('class_type')})" for k, v in sorted(graph.items(), key=lambda kv: kv[0]))
    raise QueueError(f"the workflow has no node {node!r}; its nodes are: {listing}.")


def known_inputs(object_info: dict, class_type: str) -> set[str] | None:
    info = object_info.get(class_type)
    if info is None:
        return None
    spec = info.get("input", {})
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def apply_overrides(graph: dict, overrides: list[tuple[str, str, object]], object_info: dict) -> dict:
    g = copy.deepcopy(graph)
    for node, name, value in overrides:
        nid = resolve_node(g, node)
        cls = g[nid]["class_type"]
        names = known_inputs(object_info, cls)
        if names is None:
            names = set(g[nid]["inputs"])
        if name not in names:
            raise QueueError(f"node {nid} ({cls}) has no input {name!r}; its inputs are: {', '.join(sorted(names))}.")
        g[nid]["inputs"][name] = value
    return g


def check_node_types(graph: dict, object_info: dict) -> None:
    missing = sorted({v["class_type"] for v in graph.values()} - set(object_info))
    if missing:
        hint = " Install ComfyUI-CAT into custom_nodes/ and restart the server." if any(m.startswith("CAT_") for m in missing) else ""
        raise QueueError(f"the server has no node type(s) {', '.join(missing)}.{hint}")


def load_workflow(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QueueError(f"workflow file {path} does not exist.") from None
    except ValueError as e:
        raise QueueError(f"workflow file {path} is not JSON: {e}.") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise QueueError(f"{path} is a UI-format workflow; queue needs the API format "
                         "(the workflows/api/*.api.json files, or the editor's 'Export (API)').")
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise QueueError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}}).")
    return data


class Client:
    def __init__(self, server: str, timeout: float = 30.0):
        self.base = server.rstrip("/")
        if "://" not in self.base:
            self.base = "http://" + self.base
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _req(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            payload = e.read().decode(errors="replace")
            try:
                payload = json.loads(payload)
            except ValueError:
                pass
            raise QueueError(_describe_http_error(path, e.code, payload)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise QueueError(f"cannot reach ComfyUI at {self.base} ({reason}); start it, e.g. "
                             "`python main.py --listen 127.0.0.1 --port 8188`, or pass --server URL.") from None

    def object_info(self) -> dict:
        return self._req("/object_info")

    def post(self, graph: dict) -> str:
        return self._req("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._req(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def queue_state(self, prompt_id: str) -> str | None:
        """'running', 'pending' or None (not queued) from /queue, whose items are [number, prompt_id, ...]."""
        q = self._req("/queue") or {}
        for state in ("running", "pending"):
            if any(len(item) > 1 and item[1] == prompt_id for item in q.get(f"queue_{state}", [])):
                return state
        return None


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


def outputs_of(entry: dict) -> list[dict]:
    """Where each output landed: images as output/<subfolder>/<filename>, texts (e.g. saved LoRA paths) as given."""
    found = []
    for nid, out in (entry.get("outputs") or {}).items():
        for img in out.get("images", []):
            rel = "/".join(p for p in (img.get("type", "output"), img.get("subfolder", ""), img["filename"]) if p)
            found.append({"node": nid, "kind": "image", "path": rel})
        for t in out.get("text", []):
            found.append({"node": nid, "kind": "text", "value": t})
    return found


def _status(entry: dict) -> tuple[bool, str]:
    st = entry.get("status") or {}
    ok = st.get("status_str", "success") == "success"
    msg = ""
    for name, data in st.get("messages", []):
        if name == "execution_error":
            msg = f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message', '').strip()}"
        elif name == "execution_interrupted":
            msg = "interrupted (Cancel)"
    return ok, msg


class WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's /ws events with the standard library.

    Text frames are returned; binary frames (sampler previews) are reported as b""; pings are answered.
    No extensions are requested, so the server never compresses frames.
    """

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            import ssl
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self.sock, self.buf, self.frag, self.frag_op, self.closed = sock, b"", b"", 0, False
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            self._read(deadline)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        want = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if lines[0].split(" ")[1:2] != ["101"] or headers.get("sec-websocket-accept") != want:
            sock.close()
            raise ConnectionError(f"{url} answered {lines[0]!r}, not a websocket upgrade")

    def _read(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError from None
        if not chunk:
            raise ConnectionError("the server closed the websocket")
        self.buf += chunk

    def _frame(self):
        """(fin, opcode, payload) of the first whole frame in the buffer, consumed; None if incomplete."""
        b = self.buf
        if len(b) < 2:
            return None
        n, i = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack(">Q", b[2:10])[0], 10
        mask = b[i:i + 4] if b[1] & 0x80 else None
        i += 4 if mask else 0
        if len(b) < i + n:
            return None
        payload = b[i:i + n]
        if mask:
            payload = bytes(c ^ mask[k % 4] for k, c in enumerate(payload))
        self.buf = b[i + n:]
        return bool(b[0] & 0x80), b[0] & 0x0F, payload

    def send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)  # clients must mask every frame
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                         bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                         bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(c ^ mask[k % 4] for k, c in enumerate(payload)))

    def receive(self, timeout: float) -> str | bytes:
        """The next message: str for text, bytes for binary. TimeoutError after `timeout` s without one;
        ConnectionError when the server closes the socket."""
        deadline = time.monotonic() + timeout
        while True:
            f = self._frame()
            if f is None:
                self._read(deadline)
                continue
            fin, op, payload = f
            if op == 0x8:
                raise ConnectionError("the server closed the websocket")
            if op == 0x9:
                self.send(0xA, payload)
                continue
            if op == 0xA:
                continue
            if op in (0x1, 0x2):
                self.frag_op, self.frag = op, b""
            self.frag += payload
            if fin:
                data, self.frag = self.frag, b""
                return data.decode("utf-8", errors="replace") if self.frag_op == 0x1 else data

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.send(0x8)
        except OSError:
            pass
        self.sock.close()


def connect_ws(client: Client, log=print) -> WebSocket | None:
    """The /ws websocket under this client's id, opened before any prompt is posted: ComfyUI sends a
    prompt's events only to the client id that posted it, and a prompt that fails at once would
    otherwise be over before we listen. None (and /history polling) when it cannot be opened."""
    url = client.base.replace("http", "ws", 1) + f"/ws?clientId={client.client_id}"
    try:
        return WebSocket(url, timeout=client.timeout)
    except (OSError, ValueError) as e:  # a proxy without websockets: /history still has every answer
        log(f"  (websocket {url} unavailable: {e or type(e).__name__}; polling /history, progress not shown)")
        return None


END_EVENTS = ("execution_error", "execution_interrupted", "execution_success")
# events that may come without a prompt id (our trainer broadcasts its steps) and still mean progress
UNTAGGED_PROGRESS = ("cat.train.progress", "progress", "executing", "executed")


def _show(kind: str, data: dict, log) -> None:
    if kind == "cat.train.progress":
        log(f"  train step {data['step']}/{data['total']} loss {data['loss']:.5f} (fit {data['fit']:.5f}, keep {data['keep']:.6f})")
    elif kind == "progress":
        log(f"  node {data.get('node')}: {data.get('value')}/{data.get('max')}")


def follow(client: Client, prompt_id: str, ws: WebSocket | None, timeout: float, interval: float = 1.0,
           log=print) -> dict:
    """Wait for the prompt's /history entry, printing progress from the websocket when there is one.

    /history is read every `interval` s whatever the websocket says, so a prompt that ended before or
    between events is reported within that time. `timeout` (0: none) counts seconds without progress
    while the prompt runs: no event of it on the websocket (or, when polling, none visible at all);
    time spent waiting in the queue behind other prompts does not count. A prompt that is in neither
    the queue nor /history (the server restarted, the queue was cleared) ends the wait at once.
    """
    t_progress, t_check, ended, unknown = time.monotonic(), 0.0, False, 0
    while True:
        now = time.monotonic()
        if now >= t_check:
            entry = client.history(prompt_id)
            if entry:  # ComfyUI writes a history entry once the prompt has finished (or failed)
                return entry
            where = client.queue_state(prompt_id)
            unknown = unknown + 1 if where is None else 0
            if unknown >= 2:  # twice: the move from the queue into /history is not atomic for us
                raise QueueError(f"ComfyUI no longer knows prompt {prompt_id}: it is neither queued nor in /history "
                                 "(was the server restarted or the queue/history cleared?).")
            if where == "pending":
                t_progress = now
            t_check = now + (0.2 if ended or unknown else interval)
        if timeout and now - t_progress > timeout:
            raise QueueError(f"prompt {prompt_id} made no progress for {timeout:.0f}s; it may still be running on the "
                             "server (see its console). Pass a larger --timeout (or 0 for none) for nodes that "
                             "work long without progress events.")
        wait = max(0.0, t_check - time.monotonic())
        if ws is None:
            time.sleep(wait)
            continue
        try:
            msg = ws.receive(wait)
        except TimeoutError:
            continue
        except (OSError, ValueError) as e:
            log(f"  (websocket lost: {e}; polling /history)")
            ws.close()
            ws = None
            continue
        if isinstance(msg, bytes):  # a sampler preview: sent only while our prompt runs
            t_progress = time.monotonic()
            continue
        try:
            m = json.loads(msg)
            kind, data = m.get("type"), m.get("data") or {}
        except (ValueError, AttributeError):
            continue
        if not isinstance(data, dict) or data.get("prompt_id") not in (None, prompt_id):
            continue
        if data.get("prompt_id") is None and kind not in UNTAGGED_PROGRESS:
            continue  # status broadcasts, other extensions' monitors: no sign that our prompt moves
        t_progress = time.monotonic()
        _show(kind, data, log)
        if kind in END_EVENTS or (kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
            ended, t_check = True, 0.0


def runs(graph: dict, sets: list, sweeps: list, object_info: dict) -> list[tuple[dict, dict]]:
    fixed = [(n, k, v[0]) for n, k, v in sets]
    combos = itertools.product(*[[(n, k, x) for x in v] for n, k, v in sweeps]) if sweeps else [()]
    out = []
    for combo in combos:
        g = apply_overrides(graph, fixed + list(combo), object_info)
        out.append((g, {f"{n}.{k}": x for n, k, x in combo}))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train queue", description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="API-format workflow JSON")
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.input=value")
    ap.add_argument("--sweep", action="append", default=[], metavar="NODE.input=a,b,c")
    ap.add_argument("--out", help="write the runs and where their outputs landed to this JSON file")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="give up on a run after this many seconds without progress while it runs (0: never); "
                         "waiting in the queue does not count. Default %(default)gs")
    ap.add_argument("--poll", action="store_true",
                    help="only poll /history, no websocket (progress is then invisible, so --timeout bounds each run's time)")
    ap.add_argument("--dry-run", action="store_true", help="check and print the runs, post nothing")
    a = ap.parse_args(argv)
    ws = None
    try:
        graph = load_workflow(a.workflow)
        sets = [parse_assign(s, False) for s in a.set]
        sweeps = [parse_assign(s, True) for s in a.sweep]
        client = Client(a.server)
        info = client.object_info()
        check_node_types(graph, info)
        todo = runs(graph, sets, sweeps, info)
        results = []
        ws = connect_ws(client) if not (a.poll or a.dry_run) else None
        for i, (g, label) in enumerate(todo, 1):
            print(f"run {i}/{len(todo)} {json.dumps(label) if label else ''}".rstrip())
            if a.dry_run:
                results.append({"overrides": label, "prompt": g})
                continue
            if ws is not None and ws.closed:
                ws = connect_ws(client)
            pid = client.post(g)
            print(f"  queued as {pid}")
            entry = follow(client, pid, ws, a.timeout)
            ok, msg = _status(entry)
            outs = outputs_of(entry)
            for o in outs:
                print(f"  node {o['node']}: {o.get('path') or o.get('value')}")
            if not ok:
                print(f"  FAILED: {msg}")
            results.append({"overrides": label, "prompt_id": pid, "ok": ok, "error": msg, "outputs": outs})
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2))
            print(f"wrote {a.out}")
        return 0 if all(r.get("ok", True) for r in results) else 1
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ws is not None:
            ws.close()


if __name__ == "__main__":
    sys.exit(main())
