"""`python -m cat_train queue WORKFLOW.api.json`: batch runs through a running ComfyUI server.

    python -m cat_train queue workflows/cat_vs_lora_sd15.api.json --server http://127.0.0.1:8188 \
        --set CAT_Dataset.folder=my_dog --sweep 10.cat_factor=0,0.5,1,2 --out runs.json

NODE is a node id ("10") or a node type that occurs once ("CAT_Dataset"). Values are JSON when they
parse (numbers, true/false) and strings otherwise. Each --sweep multiplies the runs (all combinations).
Every run is posted to /prompt, followed over the /ws websocket (aiohttp, which ComfyUI itself
requires; else /history is polled), and where each output landed is printed and written to --out.
Only the standard library is needed besides that optional aiohttp.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
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
                         "(the *.api.json files here, or the editor's 'Export (API)').")
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


def poll(client: Client, prompt_id: str, timeout: float, interval: float = 1.0, log=print) -> dict:
    t0 = time.monotonic()
    while True:
        entry = client.history(prompt_id)
        if entry:  # ComfyUI writes a history entry only once the prompt has finished (or failed)
            return entry
        if time.monotonic() - t0 > timeout:
            raise QueueError(f"prompt {prompt_id} did not finish within {timeout:.0f}s.")
        time.sleep(interval)


async def _follow_ws(client: Client, prompt_id: str, timeout: float, log) -> None:
    import aiohttp

    url = client.base.replace("http", "ws", 1) + f"/ws?clientId={client.client_id}"
    async with aiohttp.ClientSession() as s, s.ws_connect(url, heartbeat=30) as ws:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            msg = await ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return
                continue  # binary previews
            m = json.loads(msg.data)
            kind, data = m.get("type"), m.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "cat.train.progress":
                log(f"  train step {data['step']}/{data['total']} loss {data['loss']:.5f} (fit {data['fit']:.5f}, keep {data['keep']:.6f})")
            elif kind == "progress":
                log(f"  node {data.get('node')}: {data.get('value')}/{data.get('max')}")
            elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return
            elif kind in ("execution_error", "execution_interrupted", "execution_success"):
                return


def follow(client: Client, prompt_id: str, timeout: float, use_ws: bool, log=print) -> dict:
    if use_ws:
        try:
            asyncio.run(_follow_ws(client, prompt_id, timeout, log))
        except ImportError:
            log("  (aiohttp not installed: polling /history instead of following /ws)")
        except Exception as e:  # a proxy without websockets, a dropped connection: history still has the answer
            log(f"  (websocket unavailable: {e}; polling /history)")
    return poll(client, prompt_id, timeout, log=log)


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
    ap.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for each run")
    ap.add_argument("--poll", action="store_true", help="poll /history instead of following /ws")
    ap.add_argument("--dry-run", action="store_true", help="check and print the runs, post nothing")
    a = ap.parse_args(argv)
    try:
        graph = load_workflow(a.workflow)
        sets = [parse_assign(s, False) for s in a.set]
        sweeps = [parse_assign(s, True) for s in a.sweep]
        client = Client(a.server)
        info = client.object_info()
        check_node_types(graph, info)
        todo = runs(graph, sets, sweeps, info)
        results = []
        for i, (g, label) in enumerate(todo, 1):
            print(f"run {i}/{len(todo)} {json.dumps(label) if label else ''}".rstrip())
            if a.dry_run:
                results.append({"overrides": label, "prompt": g})
                continue
            pid = client.post(g)
            print(f"  queued as {pid}")
            entry = follow(client, pid, a.timeout, use_ws=not a.poll)
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


if __name__ == "__main__":
    sys.exit(main())
