"""`python -m cat_train queue WORKFLOW.api.json`: batch runs and sweeps through one or more ComfyUI servers.

    python -m cat_train queue workflows/api/cat_sd15_train_kps.api.json \\
        --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 --set CAT_Dataset.folder=my_dog \\
        --sweep CAT_LossConfig.cat_factor=0,0.5,1 --sweep CAT_LoraTrainer.rank=8,16 --out runs.json

NODE is a node id ("10") or a node type that occurs once ("CAT_Dataset"). Several --sweep make their
product (here 6 runs; more than --max-runs is refused). Every run's values are checked against the
server's /object_info before anything is posted, and every run gets file names made from its swept
values (CAT_SaveLora.name, the trainer's checkpoint_name, SaveImage.filename_prefix,
CAT_SaveCatVersion.name), so no run overwrites another's files.

Runs go to the server with the shortest queue, --per-server at a time (default 1). A server that stops
answering is marked down, its unfinished run re-posted elsewhere, and it is probed until it answers
again. Ctrl-C deletes this sweep's queued prompts, interrupts a running prompt only when it is ours, and
writes what finished. --out is rewritten (atomically) after every finished run; --resume skips the runs
it already holds. At the end the KPS Evaluator and Leak Scan outputs, read from /history, are gathered
into runs.md/runs.csv (beside --out) and an IS-vs-KPS chart (runs.png) with the best-balanced run
marked. docs/batch.md has the details. Only the standard library is needed (Pillow for the chart).
"""
from __future__ import annotations

import argparse
import base64
import copy
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import select
import signal
import socket
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_RUNS = 64
MAX_ATTEMPTS = 3          # posts of one run before it counts as failed (its servers kept going away)
PROBE_EVERY = 3.0         # seconds between probes of a server marked down
RETRY_DELAYS = (0.5, 1.0, 2.0)  # a failed GET is retried after these pauses before its server counts as down
# the inputs that name files: a sweep appends the run's swept values to each of them
NAME_INPUTS = {"CAT_SaveLora": "name", "CAT_LoraTrainer": "checkpoint_name", "SaveImage": "filename_prefix",
               "CAT_SaveCatVersion": "name"}
WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")


class QueueError(RuntimeError):
    pass


class ServerDown(QueueError):
    """The server did not answer (connection refused/reset, timeout, 5xx) after the retries."""


# ---------------------------------------------------------------- arguments, workflow and overrides

def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assign(text: str, sweep: bool) -> tuple[str, str, list[str]]:
    """'NODE.input=a,b' -> (NODE, input, ['a', 'b']): the texts as typed; typed against /object_info later."""
    target, eq, value = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not eq or not dot or not node or not name:
        raise QueueError(f"override {text!r} must look like NODE.input=value (NODE: a node id or a node type).")
    values = value.split(",") if sweep else [value]
    if sweep:
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise QueueError(f"--sweep {target}: the value(s) {', '.join(map(repr, dup))} occur more than once; "
                             "each value is one run.")
    return node, name, values


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


def read_server_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise QueueError(f"--server-file {path}: {e.strerror or e}.") from None
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


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


def input_spec(object_info: dict, class_type: str, name: str):
    """The /object_info spec of one input ([type, options]) or None when the server does not list it."""
    spec = (object_info.get(class_type) or {}).get("input", {})
    for part in ("required", "optional"):
        if name in spec.get(part, {}):
            return spec[part][name]
    return None


def known_inputs(object_info: dict, class_type: str) -> set[str] | None:
    info = object_info.get(class_type)
    if info is None:
        return None
    spec = info.get("input", {})
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def typed_value(text: str, spec, where: str):
    """The value ComfyUI's validation accepts for `text`, or QueueError naming the input, the value and the fix."""
    kind = spec[0] if spec else None
    opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if choices is not None:
        for cand in (text, parse_value(text)):
            if cand in choices:
                return cand
        shown = ", ".join(map(repr, choices[:12])) + (f", ... ({len(choices)} in all)" if len(choices) > 12 else "")
        raise QueueError(f"{where}={text!r}: not one of the server's choices: {shown}.")
    if kind == "STRING":
        return text
    if kind == "BOOLEAN":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise QueueError(f"{where}={text!r}: a BOOLEAN input takes true or false.")
    if kind in ("INT", "FLOAT"):
        v = parse_value(text)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (kind == "INT" and not float(v).is_integer()):
            raise QueueError(f"{where}={text!r}: not a{'n integer' if kind == 'INT' else ' number'} "
                             f"(the input is {kind}).")
        v = int(v) if kind == "INT" else float(v)
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise QueueError(f"{where}={text!r}: outside the input's range [{lo}, {hi}].")
        return v
    if isinstance(kind, str) and kind not in WIDGET_TYPES:
        raise QueueError(f"{where} takes a {kind} from another node (a link in the graph), not a value; "
                         "set an input of the node that makes it instead.")
    return parse_value(text)  # a type this client does not know: JSON when it parses, as typed otherwise


def apply_overrides(graph: dict, overrides: list[tuple[str, str, str]], object_info: dict) -> dict:
    g = copy.deepcopy(graph)
    for node, name, text in overrides:
        nid = resolve_node(g, node)
        cls = g[nid]["class_type"]
        names = known_inputs(object_info, cls)
        if names is None:
            names = set(g[nid]["inputs"])
        if name not in names:
            raise QueueError(f"node {nid} ({cls}) has no input {name!r}; its inputs are: {', '.join(sorted(names))}.")
        spec = input_spec(object_info, cls, name)
        if spec is None and _is_link(g[nid]["inputs"].get(name)):
            raise QueueError(f"{node}.{name} is a link from node {g[nid]['inputs'][name][0]} in the graph, not a value.")
        g[nid]["inputs"][name] = typed_value(text, spec, f"{node}.{name}")
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


# ---------------------------------------------------------------- runs of a sweep

@dataclass
class Run:
    index: int                 # 1-based, in sweep order
    label: dict                # "NODE.input" -> value, the swept values of this run
    graph: dict
    key: str                   # hash of the graph as posted: what --resume matches
    state: str = "todo"        # todo | active | done
    server: "Server | None" = None
    prompt_id: str = ""
    attempts: int = 0
    where: str | None = None   # running / pending, from the server's last /queue
    t_posted: float = 0.0
    t_progress: float = 0.0
    unknown: int = 0
    record: dict | None = None


def name_part(text: str) -> str:
    """A swept value as a piece of a file name: [A-Za-z0-9.+-] only, long values shortened with a hash."""
    s = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "x"
    return s if len(s) <= 24 else f"{s[:16]}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def with_suffix(name: str, suffix: str) -> str:
    stem, ext = (name[: -len(".safetensors")], ".safetensors") if name.endswith(".safetensors") else (name, "")
    return f"{stem}_{suffix}{ext}"


def run_suffix(combo: list[tuple[str, str, str]]) -> str:
    """'cat_factor0.5_rank8' from the swept (node id, input, text); the node id joins in where two sweeps
    share an input name."""
    names = [name for _, name, _ in combo]
    return "_".join((f"{nid}-{name}" if names.count(name) > 1 else name) + name_part(text) for nid, name, text in combo)


def check_run_count(sweeps: list, max_runs: int) -> int:
    n = math.prod(len(v) for _, _, v in sweeps)
    if n > max_runs:
        sizes = " x ".join(str(len(v)) for _, _, v in sweeps)
        raise QueueError(f"the sweep makes {n} runs ({sizes} values), more than --max-runs {max_runs}; "
                         f"sweep fewer values, or pass --max-runs {n} if you mean it.")
    return n


def plan_runs(graph: dict, sets: list, sweeps: list, object_info: dict, unique_names: bool = True,
              max_runs: int = DEFAULT_MAX_RUNS) -> list[Run]:
    """Every combination of the sweeps as a Run, its values typed and checked against object_info and (with
    unique_names) its file names suffixed with its swept values; nothing is posted here."""
    check_run_count(sweeps, max_runs)
    fixed = [(node, name, v[0]) for node, name, v in sets]
    base = apply_overrides(graph, fixed, object_info)
    overridden = {(resolve_node(graph, node), name) for node, name, _ in sets + sweeps}
    combos = itertools.product(*[[(node, name, x) for x in v] for node, name, v in sweeps]) if sweeps else [()]
    out, seen = [], {}
    for i, combo in enumerate(combos, 1):
        g = apply_overrides(base, list(combo), object_info)
        label = {f"{node}.{name}": g[resolve_node(g, node)]["inputs"][name] for node, name, _ in combo}
        if combo and unique_names:
            suffix = run_suffix([(resolve_node(g, node), name, text) for node, name, text in combo])
            for nid, node in g.items():
                name = NAME_INPUTS.get(node["class_type"])
                value = node["inputs"].get(name)
                if name and isinstance(value, str) and (nid, name) not in overridden:
                    node["inputs"][name] = with_suffix(value, suffix)
            names = tuple(sorted((nid, str(node["inputs"].get(NAME_INPUTS.get(node["class_type"], ""))))
                                 for nid, node in g.items() if node["class_type"] in NAME_INPUTS))
            if names and names in seen:  # two values that read alike in a file name ("a b" and "a-b")
                for nid, node in g.items():
                    name = NAME_INPUTS.get(node["class_type"])
                    if name and isinstance(node["inputs"].get(name), str) and (nid, name) not in overridden:
                        node["inputs"][name] = with_suffix(node["inputs"][name], f"run{i}")
            seen[names] = i
        key = hashlib.sha1(json.dumps(g, sort_keys=True).encode()).hexdigest()[:16]
        out.append(Run(i, label, g, key))
    return out


# ---------------------------------------------------------------- HTTP

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


# ---------------------------------------------------------------- websocket

class WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's /ws events with the standard library.

    Text frames are returned; binary frames (sampler previews) as bytes; pings are answered.
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

    def readable(self) -> bool:
        """Data waits in the TLS layer, which select() cannot see."""
        pending = getattr(self.sock, "pending", None)
        return bool(pending and pending())

    def fill(self) -> None:
        """One read from a socket that select() found readable."""
        self._read(time.monotonic() + 5.0)

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

    def buffered(self):
        """The next whole message already received (str for text, bytes for binary), or None; never reads."""
        while True:
            f = self._frame()
            if f is None:
                return None
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

    def receive(self, timeout: float) -> str | bytes:
        """The next message. TimeoutError after `timeout` s without one; ConnectionError when the server closes."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.buffered()
            if m is not None:
                return m
            self._read(deadline)

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
        return WebSocket(url, timeout=min(client.timeout, 10.0))
    except (OSError, ValueError) as e:  # a proxy without websockets: /history still has every answer
        log(f"  (websocket {url} unavailable: {e or type(e).__name__}; polling /history, progress not shown)")
        return None


END_EVENTS = ("execution_error", "execution_interrupted", "execution_success")
# events that may come without a prompt id (our trainer broadcasts its steps) and still mean progress
UNTAGGED_PROGRESS = ("cat.train.progress", "progress", "executing", "executed")


def _show(kind: str, data: dict, log, prefix: str = "") -> None:
    if kind == "cat.train.progress":
        log(f"  {prefix}train step {data['step']}/{data['total']} loss {data['loss']:.5f} "
            f"(fit {data['fit']:.5f}, keep {data['keep']:.6f})")
    elif kind == "progress":
        log(f"  {prefix}node {data.get('node')}: {data.get('value')}/{data.get('max')}")


# ---------------------------------------------------------------- scores, journal, table, chart

_SCORE = re.compile(r"^(KPS|PS|IS)\s+(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan)\b", re.M)
_LEAK_ROW = re.compile(r"^\s*1\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(.+)$", re.M)


def scores_of(entry: dict, graph: dict) -> dict:
    """{node id: {"PS", "IS", "KPS"}} of each KPS Evaluator and {node id: {"max_drift", "worst_probe"}} of each
    Leak Scan, read from the report text the nodes put in /history (their `ui` output)."""
    found = {}
    for nid, out in (entry.get("outputs") or {}).items():
        cls = graph.get(nid, {}).get("class_type")
        report = "\n".join(t for t in out.get("text", []) if isinstance(t, str))
        if cls == "CAT_KPSEvaluator":
            vals = {}
            for k, v in _SCORE.findall(report):
                vals.setdefault(k, float(v))
            if vals:
                found[nid] = vals
        elif cls == "CAT_LeakScan":
            m = _LEAK_ROW.search(report)
            if m:
                found[nid] = {"max_drift": float(m.group(1)), "worst_probe": m.group(4).strip()}
    return found


def write_journal(path: Path, records: list[dict]) -> None:
    """Atomic: a reader (or a sweep killed mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(records, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_journal(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as e:
        raise QueueError(f"--resume: {path} is not a journal this command wrote ({e}); move it away or drop --resume.") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise QueueError(f"--resume: {path} is not a journal this command wrote (a JSON list of runs).")
    return data


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_balanced(points: dict[int, tuple[float, float]]) -> int | None:
    """The run whose weaker score is strongest: each of IS and KPS is scaled to its range over the runs (worst
    0, best 1; a score equal on every run counts 1), and the run with the largest smaller scaled score wins.
    Ties: the larger sum, then the earlier run. Runs without both scores are left out. A run that another
    beats on both scores can never win, and neither can a run that is best on one score and worst on the other."""
    pts = {i: p for i, p in points.items() if _finite(p[0]) and _finite(p[1])}
    if not pts:
        return None

    def scale(v, lo, hi):
        return 1.0 if hi - lo < 1e-12 else (v - lo) / (hi - lo)

    lo = [min(p[k] for p in pts.values()) for k in (0, 1)]
    hi = [max(p[k] for p in pts.values()) for k in (0, 1)]
    scaled = {i: (scale(p[0], lo[0], hi[0]), scale(p[1], lo[1], hi[1])) for i, p in pts.items()}
    return min(scaled, key=lambda i: (-min(scaled[i]), -sum(scaled[i]), i))


def short_label(label: dict) -> str:
    """'cat_factor=0.5 rank=8': the input names alone where they tell the sweeps apart."""
    names = [k.rsplit(".", 1)[1] for k in label]
    return " ".join(f"{k.rsplit('.', 1)[1] if names.count(k.rsplit('.', 1)[1]) == 1 else k}={_value_text(v)}"
                    for k, v in label.items())


def sweep_table(records: list[dict], score_node: str | None = None):
    """(columns, rows, points, best run number, the KPS node that scores them). Rows are dicts keyed by column;
    points maps each finished run to its (IS, KPS) from that node."""
    sweep_keys = list(dict.fromkeys(k for r in records for k in r.get("overrides", {})))
    kps_nodes = sorted({n for r in records for n, s in (r.get("scores") or {}).items() if "KPS" in s}, key=_node_order)
    leak_nodes = sorted({n for r in records for n, s in (r.get("scores") or {}).items() if "max_drift" in s}, key=_node_order)
    primary = score_node if score_node else (kps_nodes[0] if kps_nodes else None)

    def col(name, nid, many):
        return f"{name}@{nid}" if many else name

    columns = ["run", *sweep_keys, "status", "server", "seconds"]
    columns += [col(m, n, len(kps_nodes) > 1) for n in kps_nodes for m in ("PS", "IS", "KPS")]
    columns += [col(m, n, len(leak_nodes) > 1) for n in leak_nodes for m in ("max drift", "worst probe")]
    columns += ["best"]
    rows, points = [], {}
    for r in sorted(records, key=lambda r: r.get("run", 0)):
        row = {"run": r.get("run"), **{k: _value_text(r.get("overrides", {}).get(k, "")) for k in sweep_keys},
               "status": "ok" if r.get("ok") else f"failed: {r.get('error', '')}".strip(),
               "server": r.get("server", ""), "seconds": f"{r.get('seconds', 0):.1f}"}
        sc = r.get("scores") or {}
        for n in kps_nodes:
            for m in ("PS", "IS", "KPS"):
                row[col(m, n, len(kps_nodes) > 1)] = sc.get(n, {}).get(m, "")
        for n in leak_nodes:
            row[col("max drift", n, len(leak_nodes) > 1)] = sc.get(n, {}).get("max_drift", "")
            row[col("worst probe", n, len(leak_nodes) > 1)] = sc.get(n, {}).get("worst_probe", "")
        if r.get("ok") and primary in sc:
            points[r.get("run")] = (sc[primary].get("IS", math.nan), sc[primary].get("KPS", math.nan))
        rows.append(row)
    best = best_balanced(points)
    for row in rows:
        row["best"] = "best" if best is not None and row["run"] == best else ""
    return columns, rows, points, best, primary


def _value_text(v) -> str:
    """A swept value as the user typed it: 0.5, 1 (not 1.0000), true, text."""
    if isinstance(v, float):
        return f"{v:g}" if v == v and float(f"{v:g}") == v else repr(v)
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _node_order(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else "nan"
    return str(v)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(_cell(row.get(c, ""))) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(columns: list[str], rows: list[dict]) -> str:
    """Numbers in full (the markdown rounds them to 4 decimals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([row.get(c, "") for c in columns])
    return buf.getvalue()


def chart(points: list[tuple[str, float, float]], best: str | None, size=(720, 460)):
    """IS (x) against KPS (y), one dot per run labelled with its swept values; the best-balanced run ringed.
    A PIL image; cat_train.plot supplies fonts, ticks and colours (Pillow is needed here only)."""
    from PIL import Image, ImageDraw

    from . import plot

    w, h = size
    f, fs = plot.font(13), plot.font(11)
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 24, 40, 48
    plot.text(d, (left, 10), "IS vs KPS, one dot per run; ringed: the best-balanced run", f, plot.INK)

    def span(vs):
        lo, hi = min(vs), max(vs)
        pad = (hi - lo) * 0.12 or max(abs(hi) * 0.1, 0.01)
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span([p[1] for p in points]), span([p[2] for p in points])
    pw, ph = w - left - right, h - top - bottom

    def X(v):
        return left + pw * (v - x0) / (x1 - x0)

    def Y(v):
        return top + ph * (1 - (v - y0) / (y1 - y0))

    yt = [t for t in plot.nice_ticks(y0, y1) if y0 <= t <= y1]
    for v, lab in zip(yt, plot.labels(yt)):
        d.line([(left, Y(v)), (w - right, Y(v))], fill=plot.GRID)
        plot.text(d, (left - 6, Y(v)), lab, fs, plot.GREY, "rm")
    xt = [t for t in plot.nice_ticks(x0, x1, 6) if x0 <= t <= x1]
    for v, lab in zip(xt, plot.labels(xt)):
        d.line([(X(v), top), (X(v), h - bottom)], fill=plot.GRID)
        plot.text(d, (X(v), h - bottom + 6), lab, fs, plot.GREY, "mt")
    d.rectangle([left, top, w - right, h - bottom], outline=plot.GREY)
    plot.text(d, (left + pw / 2, h - 6), "IS (identity: higher = more like the references)", fs, plot.GREY, "md")
    plot.text(d, (6, top - 14), "KPS (higher = less leakage)", fs, plot.GREY)
    for i, (name, x, y) in enumerate(points):
        px, py = X(x), Y(y)
        if name == best:
            d.ellipse([px - 11, py - 11, px + 11, py + 11], outline=plot.INK, width=2)
        d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=plot.PALETTE[i % len(plot.PALETTE)])
        anchor = "rm" if px > left + pw * 0.6 else "lm"
        plot.text(d, (px + (-14 if anchor == "rm" else 14), py), name + ("  (best)" if name == best else ""), fs,
                  plot.INK, anchor)
    return img


BEST_RULE = ("best = the run whose weaker score is strongest, IS and KPS each scaled to its range over the finished "
             "runs (docs/batch.md)")


def write_report(out: Path, records: list[dict], score_node: str | None, log=print) -> str:
    """runs.md, runs.csv and runs.png beside --out (runs.json); returns the markdown table."""
    columns, rows, points, best, primary = sweep_table(records, score_node)
    md = markdown_table(columns, rows)
    where = f"KPS Evaluator node {primary}" if primary else "no KPS Evaluator output in these runs"
    out.with_suffix(".md").write_text(f"# Sweep: {len(rows)} run(s)\n\nScores from {where}; {BEST_RULE}.\n\n{md}\n")
    out.with_suffix(".csv").write_text(csv_table(columns, rows))
    labels = {r.get("run"): f"run {r.get('run')}" + (f": {short_label(r['overrides'])}" if r.get("overrides") else "")
              for r in records}
    pts = [(labels[i], p[0], p[1]) for i, p in sorted(points.items()) if _finite(p[0]) and _finite(p[1])]
    png = out.with_suffix(".png")
    png.unlink(missing_ok=True)
    if not pts:
        log("no chart: no finished run has both IS and KPS (IS needs reference_images on the KPS Evaluator)")
        return md
    try:
        chart(pts, labels.get(best)).save(png)
    except ImportError:
        log("no chart: Pillow is not installed (pip install pillow); the table has every number")
    return md


# ---------------------------------------------------------------- servers and the sweep

@dataclass
class Server:
    client: Client
    up: bool = True
    usable: bool = True
    ws: WebSocket | None = None
    active: list = field(default_factory=list)
    t_check: float = 0.0
    t_probe: float = 0.0
    info: dict | None = None

    @property
    def name(self) -> str:
        return self.client.base


class Sweep:
    def __init__(self, servers: list[Server], runs: list[Run], out: Path | None, per_server: int, timeout: float,
                 poll: bool, interval: float = 1.0, log=print, plan=None, previous: list[dict] | None = None):
        self.servers, self.runs, self.out, self.per_server = servers, runs, out, per_server
        self.timeout, self.poll, self.interval, self.log, self.plan = timeout, poll, interval, log, plan
        self.previous = previous or []  # journal records of runs not in this sweep: kept as they were
        self.posted: set[str] = set()
        self.t_none_up: float | None = None

    # -- journal
    def records(self) -> list[dict]:
        return self.previous + sorted((r.record for r in self.runs if r.record), key=lambda rec: rec["run"])

    def save(self) -> None:
        if self.out:
            write_journal(self.out, self.records())

    # -- server health
    def mark_down(self, s: Server, why: str) -> None:
        if not s.up:
            return
        s.up, s.t_probe = False, time.monotonic() + PROBE_EVERY
        if s.ws is not None:
            s.ws.close()
            s.ws = None
        moved = [r for r in s.active]
        s.active.clear()
        for r in moved:
            r.state, r.server, r.where = "todo", None, None
        note = f"; run {', '.join(str(r.index) for r in moved)} will be posted again" if moved else ""
        self.log(f"server {s.name} marked down: {why}{note}")

    def probe(self, now: float) -> None:
        for s in self.servers:
            if s.up or not s.usable or now < s.t_probe:
                continue
            s.t_probe = now + PROBE_EVERY
            try:
                q = s.client.queue(retry=False, timeout=5.0)
                if s.info is None:
                    s.info = s.client.object_info()
                    check_node_types(next(iter(self.runs)).graph if self.runs else {}, s.info)
                    if self.plan is not None:
                        self.plan(s.info)  # the same checks as at the start, against this server's nodes
            except ServerDown:
                continue
            except QueueError as e:
                s.usable = False
                self.log(f"server {s.name} answers but cannot run this sweep: {e}")
                continue
            s.up = True
            self.log(f"server {s.name} is back")
            self.drop_strays(s, q)

    def drop_strays(self, s: Server, q: dict) -> None:
        """Our prompts on a server that came back but that we no longer follow (re-posted elsewhere): removed,
        so a run does not train twice."""
        mine = {r.prompt_id for r in s.active}
        stray = [(st, item[1]) for st in ("running", "pending") for item in q.get(f"queue_{st}", [])
                 if len(item) > 1 and item[1] in self.posted and item[1] not in mine]
        try:
            if any(st == "pending" for st, _ in stray):
                s.client.delete([pid for st, pid in stray if st == "pending"])
            for st, pid in stray:
                if st == "running":
                    s.client.interrupt(pid)
        except QueueError:
            return
        if stray:
            self.log(f"  removed {len(stray)} prompt(s) of ours from {s.name} that were posted again elsewhere")

    # -- dispatch
    def dispatch(self) -> None:
        while True:
            todo = [r for r in self.runs if r.state == "todo"]
            free = [s for s in self.servers if s.up and s.usable and len(s.active) < self.per_server]
            if not todo or not free:
                return
            lengths = {}
            for s in free:
                try:
                    q = s.client.queue()
                    lengths[s.name] = len(q.get("queue_running", [])) + len(q.get("queue_pending", []))
                except ServerDown as e:
                    self.mark_down(s, str(e))
            free = [s for s in free if s.up]
            if not free:
                return
            s = min(free, key=lambda s: (lengths[s.name], len(s.active), self.servers.index(s)))
            self.post(todo[0], s, lengths[s.name])

    def post(self, r: Run, s: Server, queued: int) -> None:
        if r.attempts >= MAX_ATTEMPTS:
            self.finish(r, None, f"posted {r.attempts} times and each time its server went away or forgot it")
            return
        r.attempts += 1
        total = len(self.runs)
        self.log(f"run {r.index}/{total}{' ' + json.dumps(r.label) if r.label else ''} -> {s.name}"
                 + (f" (behind {queued} queued)" if queued else "") + (f", attempt {r.attempts}" if r.attempts > 1 else ""))
        if not self.poll and (s.ws is None or s.ws.closed):
            s.ws = connect_ws(s.client, self.log)
        pid = uuid.uuid4().hex
        self.posted.add(pid)
        try:
            pid = s.client.post(r.graph, pid)
        except ServerDown as e:
            self.mark_down(s, str(e))
            return
        except QueueError as e:
            self.finish(r, None, str(e), server=s)
            return
        self.posted.add(pid)
        now = time.monotonic()
        r.state, r.server, r.prompt_id, r.where, r.unknown = "active", s, pid, None, 0
        r.t_posted = r.t_progress = now
        s.active.append(r)
        s.t_check = min(s.t_check, now + 0.2)
        self.log(f"  queued as {pid}")

    # -- following
    def check(self, now: float) -> None:
        for s in self.servers:
            if not (s.up and s.active) or now < s.t_check:
                continue
            try:
                self.check_server(s, now)
            except ServerDown as e:
                self.mark_down(s, str(e))

    def check_server(self, s: Server, now: float) -> None:
        soon = False
        for r in list(s.active):
            entry = s.client.history(r.prompt_id)
            if entry:  # ComfyUI writes a history entry once the prompt has finished (or failed)
                self.finish(r, entry)
                continue
            where = s.client.queue_state(r.prompt_id)
            r.unknown = r.unknown + 1 if where is None else 0
            r.where = where
            if r.unknown >= 2:  # twice: the move from the queue into /history is not atomic for us
                self.log(f"  run {r.index}: ComfyUI at {s.name} no longer knows prompt {r.prompt_id}: it is neither "
                         "queued nor in /history (was the server restarted or the queue/history cleared?); posting it again")
                s.active.remove(r)
                r.state, r.server = "todo", None
                continue
            soon = soon or r.unknown > 0
            if where == "pending":
                r.t_progress = now
            elif self.timeout and now - r.t_progress > self.timeout:
                try:
                    s.client.interrupt(r.prompt_id)
                except QueueError:
                    pass
                self.finish(r, None, f"prompt {r.prompt_id} made no progress for {self.timeout:.0f}s; interrupted it. "
                            "Pass a larger --timeout (or 0 for none) for nodes that work long without progress events.")
        s.t_check = now + (0.2 if soon else self.interval)

    def finish(self, r: Run, entry: dict | None, error: str = "", server: Server | None = None) -> None:
        s = r.server or server
        if r in (s.active if s else []):
            s.active.remove(r)
        ok, msg = _status(entry) if entry is not None else (False, error)
        outs = outputs_of(entry) if entry is not None else []
        r.state = "done"
        r.record = {"run": r.index, "overrides": r.label, "key": r.key, "prompt_id": r.prompt_id,
                    "server": s.name if s else "", "ok": ok, "error": msg, "outputs": outs,
                    "scores": scores_of(entry, r.graph) if entry is not None else {},
                    "seconds": round(time.monotonic() - r.t_posted, 2) if r.t_posted else 0.0, "attempts": r.attempts}
        done = sum(1 for x in self.runs if x.state == "done")
        self.log(f"run {r.index}/{len(self.runs)} {'finished' if ok else 'FAILED'} on {r.record['server']} "
                 f"({done}/{len(self.runs)} done)")
        for o in outs:
            self.log(f"  node {o['node']}: " + str(o.get('path') or o.get('value')).replace("\n", "\n    "))
        if not ok:
            self.log(f"  FAILED: {msg}")
        self.save()

    def events(self, wait: float) -> None:
        """Progress from every server's websocket for up to `wait` s (a sleep when none is open)."""
        open_ = [s for s in self.servers if s.ws is not None and not s.ws.closed]
        for s in open_:
            self.drain(s)
        open_ = [s for s in open_ if s.ws is not None]
        if not open_:
            time.sleep(wait)
            return
        ready = [s for s in open_ if s.ws.readable()]
        if not ready:
            socks = {s.ws.sock: s for s in open_}
            r, _, _ = select.select(list(socks), [], [], wait)
            ready = [socks[x] for x in r]
        for s in ready:
            try:
                s.ws.fill()
            except (OSError, ValueError) as e:
                self._ws_lost(s, e)
                continue
            self.drain(s)

    def _ws_lost(self, s: Server, e) -> None:
        if s.ws is not None:
            self.log(f"  (websocket of {s.name} lost: {e or type(e).__name__}; polling /history)")
            s.ws.close()
            s.ws = None

    def drain(self, s: Server) -> None:
        while s.ws is not None:
            try:
                msg = s.ws.buffered()
            except (OSError, ValueError) as e:
                self._ws_lost(s, e)
                return
            if msg is None:
                return
            self.on_event(s, msg)

    def on_event(self, s: Server, msg) -> None:
        running = [r for r in s.active if r.where != "pending"]
        if isinstance(msg, bytes):  # a sampler preview: sent only to the client whose prompt runs
            for r in running:
                r.t_progress = time.monotonic()
            return
        try:
            m = json.loads(msg)
            kind, data = m.get("type"), m.get("data") or {}
        except (ValueError, AttributeError):
            return
        if not isinstance(data, dict):
            return
        pid = data.get("prompt_id")
        if pid is None:
            if kind not in UNTAGGED_PROGRESS or len(running) != 1:
                return  # status broadcasts, other extensions' monitors: no sign that our prompt moves
            r = running[0]
        else:
            r = next((x for x in s.active if x.prompt_id == pid), None)
            if r is None:
                return
        r.t_progress = time.monotonic()
        _show(kind, data, self.log, f"[run {r.index}] " if len(self.runs) > 1 else "")
        if kind in END_EVENTS or (kind == "executing" and data.get("node") is None and pid == r.prompt_id):
            s.t_check = 0.0  # read /history now

    # -- the loop
    def run(self) -> None:
        while any(r.state != "done" for r in self.runs):
            now = time.monotonic()
            self.probe(now)
            self.dispatch()
            self.check(time.monotonic())
            if any(s.up and s.usable for s in self.servers):
                self.t_none_up = None
            elif self.t_none_up is None:
                self.t_none_up = now
                self.log(f"no server answers; probing every {PROBE_EVERY:g}s"
                         + (f" for up to {self.timeout:g}s" if self.timeout else ""))
            if not any(s.usable for s in self.servers):
                raise QueueError("no server can run this sweep (see above).")
            if self.t_none_up is not None and self.timeout and now - self.t_none_up > self.timeout:
                left = sum(1 for r in self.runs if r.state != "done")
                raise QueueError(f"no server answered for {self.timeout:.0f}s; {left} run(s) not finished "
                                 "(--resume continues them once a server is up).")
            if not any(r.state != "done" for r in self.runs):
                return
            nxt = [s.t_check for s in self.servers if s.up and s.active] + \
                  [s.t_probe for s in self.servers if not s.up and s.usable]
            wait = max(0.0, min(nxt, default=now + 0.5) - time.monotonic())
            self.events(min(wait, 0.5))

    def cancel(self, settle: float = 10.0) -> None:
        """Ctrl-C: on every server, delete our queued prompts, then interrupt a running prompt only when it is
        ours (/interrupt with its id), and wait up to `settle` s for those to stop."""
        running = {}
        for s in self.servers:
            try:
                q = s.client.queue(retry=False, timeout=5.0)
                pend = [it[1] for it in q.get("queue_pending", []) if len(it) > 1 and it[1] in self.posted]
                run = [it[1] for it in q.get("queue_running", []) if len(it) > 1 and it[1] in self.posted]
                if pend:
                    s.client.delete(pend)
                for pid in run:
                    s.client.interrupt(pid)
            except QueueError as e:
                self.log(f"  {s.name}: could not cancel ({e})")
                continue
            if pend or run:
                self.log(f"  {s.name}: removed {len(pend)} queued prompt(s) of this sweep, interrupted {len(run)} running")
            if run:
                running[s.name] = (s, set(run))
        deadline = time.monotonic() + settle
        while running and time.monotonic() < deadline:
            time.sleep(0.3)
            for name, (s, pids) in list(running.items()):
                try:
                    q = s.client.queue(retry=False, timeout=5.0)
                except QueueError:
                    del running[name]
                    continue
                if not any(state_in(q, pid) for pid in pids):
                    del running[name]
        for name in running:
            self.log(f"  {name}: our prompt is still stopping (it stops at its next step)")


# ---------------------------------------------------------------- command line

def non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{text} must be 0 (no limit) or a positive number of seconds")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cat_train queue", description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="API-format workflow JSON")
    ap.add_argument("--server", action="append", default=[], metavar="URL",
                    help="a ComfyUI server; give it once per server (default http://127.0.0.1:8188)")
    ap.add_argument("--server-file", metavar="FILE", help="a file of server URLs, one a line (# comments)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.input=value")
    ap.add_argument("--sweep", action="append", default=[], metavar="NODE.input=a,b,c",
                    help="one run per value; several --sweep make every combination")
    ap.add_argument("--max-runs", type=positive_int, default=DEFAULT_MAX_RUNS,
                    help="refuse a sweep of more runs than this. Default %(default)s")
    ap.add_argument("--per-server", type=positive_int, default=1,
                    help="prompts of this sweep queued on one server at a time. Default %(default)s")
    ap.add_argument("--keep-names", action="store_true",
                    help="leave file names as the graph has them (runs then save as name, name_00001, ...)")
    ap.add_argument("--out", help="journal: the finished runs and where their outputs landed, rewritten after each "
                                  "run; runs.md/.csv/.png beside it")
    ap.add_argument("--resume", action="store_true", help="skip the runs that --out already holds as finished")
    ap.add_argument("--score-node", metavar="ID", help="the KPS Evaluator whose IS/KPS pick the best run "
                                                       "(default: the lowest node id)")
    ap.add_argument("--timeout", type=non_negative, default=600.0,
                    help="give up on a run after this many seconds without progress while it runs, and on the sweep "
                         "when no server answers for this long (0: never); waiting in the queue does not count. "
                         "Default %(default)gs")
    ap.add_argument("--poll", action="store_true",
                    help="only poll /history, no websocket (progress is then invisible, so --timeout bounds each run's time)")
    ap.add_argument("--dry-run", action="store_true", help="check and print the runs, post nothing")
    return ap


def connect_servers(urls: list[str], graph: dict, plan, log) -> list[Server]:
    """One Server per URL, each asked for its nodes and checked against every run; those that cannot run the
    sweep are left out, those that do not answer yet are marked down (and probed later). QueueError when no
    server can run it: the first refusal as it is (a bad override is refused the same by every server)."""
    servers, down, refused = [], [], []
    cid = uuid.uuid4().hex  # one client id for the whole sweep: every prompt of ours carries it
    for url in urls:
        s = Server(Client(url, client_id=cid))
        try:
            s.info = s.client.object_info()
            check_node_types(graph, s.info)
            plan(s.info)
        except ServerDown as e:
            s.up = False
            down.append(str(e))
        except QueueError as e:
            s.usable = False
            refused.append((s, e))
        servers.append(s)
    if not any(s.up and s.usable for s in servers):
        if refused:
            raise refused[0][1]
        raise QueueError(down[0] if len(down) == 1 else "no server answers:\n  " + "\n  ".join(down))
    for s, e in refused:
        log(f"server {s.name} is left out: {e}")
    for s in servers:
        if not s.up:
            log(f"server {s.name} does not answer yet; it is probed every {PROBE_EVERY:g}s")
    return servers


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    sweep = None
    out = Path(a.out) if a.out else None
    try:
        urls = [server_url(u) for u in a.server + (read_server_file(a.server_file) if a.server_file else [])]
        urls = list(dict.fromkeys(urls)) or ["http://127.0.0.1:8188"]
        if out and out.suffix.lower() in (".md", ".csv", ".png"):
            raise QueueError(f"--out {out} names the journal (runs.json); the table and chart are written beside it "
                             "as runs.md, runs.csv and runs.png.")
        if a.resume and not out:
            raise QueueError("--resume needs --out, the journal of the sweep to continue.")
        graph = load_workflow(a.workflow)
        sets = [parse_assign(s, False) for s in a.set]
        sweeps = [parse_assign(s, True) for s in a.sweep]
        check_run_count(sweeps, a.max_runs)  # before any request: a typo must not cost a minute of checks

        def plan(info):
            return plan_runs(graph, sets, sweeps, info, unique_names=not a.keep_names, max_runs=a.max_runs)

        servers = connect_servers(urls, graph, plan, print)
        first = next(s for s in servers if s.up and s.usable)
        runs = plan(first.info)
        previous = []
        if a.resume:
            journal = read_journal(out)
            done = {rec.get("key"): rec for rec in journal if rec.get("ok")}
            for r in runs:
                if r.key in done:
                    r.state, r.record = "done", {**done[r.key], "run": r.index}
            keys = {r.key for r in runs}
            previous = [rec for rec in journal if rec.get("ok") and rec.get("key") not in keys]
            skipped = sum(r.state == "done" for r in runs)
            print(f"resume: {skipped} of {len(runs)} run(s) already finished in {out}; posting {len(runs) - skipped}"
                  + (f" ({len(previous)} finished run(s) of other settings kept in the journal)" if previous else ""))
        if a.dry_run:
            for r in runs:
                print(f"run {r.index}/{len(runs)} {json.dumps(r.label) if r.label else ''}".rstrip())
                for nid, node in r.graph.items():
                    name = NAME_INPUTS.get(node["class_type"])
                    if name and name in node["inputs"]:
                        print(f"  node {nid} ({node['class_type']}) {name} = {node['inputs'][name]}")
            return 0
        sweep = Sweep(servers, runs, out, a.per_server, a.timeout, a.poll, plan=plan, previous=previous)
        try:
            sweep.run()
        finally:
            for s in servers:
                if s.ws is not None:
                    s.ws.close()
        records = sweep.records()
        _report(out, records, a.score_node, len(runs) > 1)
        return 0 if all(r.get("ok") for r in records) else 1
    except KeyboardInterrupt:
        try:  # a second Ctrl-C must not cut the cancel short (signals can be set in the main thread only)
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:
            old = None
        try:
            print("interrupted: cancelling this sweep's prompts", file=sys.stderr)
            if sweep is not None:
                sweep.cancel()
                _stopped(sweep, out, a.score_node)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        return 130
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        if sweep is not None:
            _stopped(sweep, out, a.score_node)
        return 2


def _stopped(sweep: Sweep, out: Path | None, score_node: str | None) -> None:
    """What finished before an early stop: the journal (and its table) hold exactly those runs."""
    sweep.save()
    records = sweep.records()
    if out:
        print(f"wrote {out}: {len(records)} finished run(s); --resume continues the rest", file=sys.stderr)
        if records:
            _report(out, records, score_node, True)


def _report(out: Path | None, records: list[dict], score_node: str | None, table: bool) -> None:
    if out:
        write_journal(out, records)
        print(f"wrote {out}")
    if not table or not records:
        return
    if out:
        md = write_report(out, records, score_node)
        print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.csv')}"
              + (f", {out.with_suffix('.png')}" if out.with_suffix(".png").exists() else ""))
    else:
        columns, rows, _, _, _ = sweep_table(records, score_node)
        md = markdown_table(columns, rows)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
