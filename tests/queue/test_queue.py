"""`python -m cat_train queue` against fake ComfyUI servers on 127.0.0.1 (stdlib http.server with a minimal
websocket at /ws and a clock-driven queue: each prompt runs for `duration(graph)` seconds after the one before)."""
from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cat_train.queue import cli, dispatch
from cat_train.queue import client as queue_client
from cat_train.queue.history import scores_of
from cat_train.queue.report import best_balanced

ROOT = Path(__file__).resolve().parents[2]
GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "3": {"class_type": "CAT_LossConfig",
          "inputs": {"cat_factor": 1.0, "preservation": "class", "class_word": "dog", "token_weights": ""}},
    "4": {"class_type": "CAT_LoraTrainer", "inputs": {"model": ["1", 0], "loss_config": ["3", 0], "steps": 600,
                                                      "checkpoint_name": "ckpt"}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 2], "filename_prefix": "cat"}},
    "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 2], "filename_prefix": "cat2"}},
    "8": {"class_type": "CAT_KPSEvaluator",
          "inputs": {"images_with_trigger": ["4", 2], "images_without_trigger": ["4", 2]}},
    "9": {"class_type": "CAT_SaveLora", "inputs": {"lora": ["4", 1], "name": "lora"}},
}
INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["x.safetensors"]]}}},
    "CAT_LossConfig": {"input": {"required": {"cat_factor": ["FLOAT", {"min": 0.0, "max": 10.0}],
                                              "preservation": ["COMBO", {"options": ["class", "none"]}],
                                              "class_word": ["STRING", {}], "token_weights": ["STRING", {}]}}},
    "CAT_LoraTrainer": {"input": {"required": {"model": ["MODEL"], "loss_config": ["CAT_LOSS_CONFIG"],
                                               "steps": ["INT", {}],
                                               "checkpoint_name": ["STRING", {}]},
                                  "optional": {"resume_from": ["STRING", {}]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}},
    "CAT_KPSEvaluator": {"input": {"required": {"images_with_trigger": ["IMAGE"],
                                                "images_without_trigger": ["IMAGE"]}}},
    "CAT_SaveLora": {"input": {"required": {"lora": ["LORA_MODEL"], "name": ["STRING", {}]}}},
}


def _sigint_as_from_a_terminal() -> None:
    """The CLI's child gets Ctrl-C as a shell gives it: a runner started in the background by a non-interactive shell
    (`cmd &`) ignores SIGINT, and a child inherits that, so Python would install no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)



def kps_report(is_: float, kps: float) -> str:
    """The KPS Evaluator's report text, as nodes/evaluate.py writes it."""
    return (f"KPS {kps:.4f} (1 - H of with/without-trigger image similarity; higher = less leakage)\n"
            f"PS  0.2500 (prompt fidelity)\nIS  {is_:.4f} (identity)\n4 pairs; similarities clamped at 1e-6: \n"
            "paper (Table 1): LoRA KPS 0.0808, CAT 0.1231")


def ws_frame(payload, binary: bool = False) -> bytes:
    """One unmasked server frame (RFC 6455), with the 16- and 64-bit length forms."""
    data = payload if binary else json.dumps(payload).encode()
    n = len(data)
    length = (bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536
              else bytes([127]) + struct.pack(">Q", n))
    return bytes([0x82 if binary else 0x81]) + length + data


FAILED = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
    ["execution_start", {"prompt_id": "PID"}],
    ["execution_error", {"prompt_id": "PID", "node_id": "1", "node_type": "CheckpointLoaderSimple",
                         "exception_message": "Value not in list: ckpt_name: 'x.safetensors' not in []"}]]}}


def canonical_uuid(value) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        return False


class FakeComfy:
    """One fake server. mode: ok (each prompt runs `duration(graph)` s after the one before, then is in /history),
    fail (ends with an execution error), stuck (runs forever), lost (forgotten at once), down (answers nothing)."""

    def __init__(self):
        self.mode, self.info, self.events = "ok", INFO, []
        self.duration = lambda g: 0.0
        self.scores = lambda g: (0.5, 0.1)
        self.history_500 = 0
        self.on_post = None
        self.failed = FAILED   # the /history entry of a prompt in mode "fail"
        self.info_body = None  # (content type, bytes) answered on /object_info instead of the node list
        self.info_delay = 0.0  # seconds /object_info waits before it answers (a busy server)
        self.released = threading.Event()  # ends that wait at close
        self.reset()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                fake.handle(self, "GET")

            def do_POST(self):
                fake.handle(self, "POST")

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def reset(self):
        """A (re)started server: empty queue and history."""
        self.lock = threading.Lock()
        self.jobs: dict = {}      # prompt id -> {graph, client, start, end, state}
        self.order: list = []     # prompt ids in post order
        self.log: list = []       # ("ws", client id) / ("post", client id), in order
        self.sockets: dict = {}
        self.interrupts: list = []
        self.deletes: list = []
        self.free_at = 0.0
        self.max_ours = 0

    def add(self, graph, client="someone", seconds=None, pid=None):
        with self.lock:
            pid = pid or f"p{len(self.order)}"
            now = time.monotonic()
            start = max(now, self.free_at)
            end = start + (self.duration(graph) if seconds is None else seconds)
            self.free_at = end
            self.jobs[pid] = {"graph": graph, "client": client, "start": start, "end": end, "state": None}
            self.order.append(pid)
            ours = sum(1 for j in self.jobs.values()
                       if j["client"] == client and self.where(j, now) in ("running", "pending"))
            if client != "someone":
                self.max_ours = max(self.max_ours, ours)
            return pid

    def where(self, job, now):
        if job["state"] == "deleted" or self.mode == "lost":
            return None
        if job["state"] == "interrupted" or (self.mode != "stuck" and now >= job["end"]):
            return "done"
        return "pending" if now < job["start"] else "running"

    def ours(self, client_id):
        return [pid for pid in self.order if self.jobs[pid]["client"] == client_id]

    def close(self):
        self.released.set()
        for sock in list(self.sockets.values()):  # a websocket left open would keep server_close waiting
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.srv.shutdown()
        self.srv.server_close()

    def go_down(self):
        self.mode = "down"
        for sock in list(self.sockets.values()):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def come_back(self):
        self.reset()
        self.mode = "ok"

    # -- HTTP
    def send(self, h, code, obj):
        body = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def handle(self, h, method):
        if self.mode == "down":  # no answer: the client sees the connection close
            h.close_connection = True
            return
        path = h.path
        if method == "GET":
            if path == "/object_info":
                if self.info_delay:
                    self.released.wait(self.info_delay)
                if self.info_body:
                    h.send_response(200)
                    h.send_header("Content-Type", self.info_body[0])
                    h.send_header("Content-Length", str(len(self.info_body[1])))
                    h.end_headers()
                    return h.wfile.write(self.info_body[1])
                return self.send(h, 200, self.info)
            if path.startswith("/ws"):
                return self.websocket(h)
            if path == "/queue":
                now = time.monotonic()
                with self.lock:
                    items = {pid: [0, pid, j["graph"], {"client_id": j["client"]}, []] for pid, j in self.jobs.items()}
                    running = [items[p] for p in self.order if self.where(self.jobs[p], now) == "running"]
                    pending = [items[p] for p in self.order if self.where(self.jobs[p], now) == "pending"]
                return self.send(h, 200, {"queue_running": running, "queue_pending": pending})
            if path.startswith("/history/"):
                if self.history_500:
                    self.history_500 -= 1
                    return self.send(h, 500, {"error": "boom"})
                pid = path.rsplit("/", 1)[1]
                job = self.jobs.get(pid)
                if job is None or self.where(job, time.monotonic()) != "done":
                    return self.send(h, 200, {})
                return self.send(h, 200, {pid: self.entry(pid, job)})
            return self.send(h, 404, {})
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        if path == "/interrupt":
            pid = body.get("prompt_id")
            self.interrupts.append(pid)
            job = self.jobs.get(pid)
            if job and self.where(job, time.monotonic()) == "running":
                job["state"], job["end"] = "interrupted", time.monotonic()
            return self.send(h, 200, {})
        if path == "/queue":
            self.deletes += body.get("delete", [])
            for pid in body.get("delete", []):
                if pid in self.jobs and self.where(self.jobs[pid], time.monotonic()) == "pending":
                    self.jobs[pid]["state"] = "deleted"
            return self.send(h, 200, {})
        if not canonical_uuid(body.get("prompt_id", str(uuid.uuid4()))):  # as ComfyUI v0.33 refuses it
            return self.send(h, 400,
                             {"error": {"type": "invalid_prompt_id", "message": "prompt_id must be a valid UUID",
                                                "details": "prompt_id must be a UUID string in canonical lowercase "
                                                           "hyphenated form; omit it to let the server generate one"},
                              "node_errors": {}})
        if body["prompt"]["4"]["inputs"].get("steps") == -1:  # what ComfyUI answers to an invalid value
            return self.send(h, 400,
                             {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                                                                                               "validation",
                                                "details": ""},
                                      "node_errors": {"4": {"class_type": "CAT_LoraTrainer", "errors": [
                                          {"message": "Value smaller than min", "details": "steps: -1 < 1"}]}}})
        if self.on_post:
            self.on_post(self)
            if self.mode == "down":
                h.close_connection = True
                return
        with self.lock:
            self.log.append(("post", body.get("client_id")))
        pid = self.add(body["prompt"], body.get("client_id"), pid=body.get("prompt_id"))
        self.send(h, 200, {"prompt_id": pid, "number": 0, "node_errors": {}})
        ws = self.sockets.get(body.get("client_id"))
        for e in self.events:
            frame = (ws_frame(e, binary=True) if isinstance(e, bytes)
                     else ws_frame(json.loads(json.dumps(e).replace("PID", pid))))
            with self.lock:
                ws.sendall(frame)

    def entry(self, pid, job):
        if job["state"] == "interrupted":
            return {"outputs": {},
                    "status": {"status_str": "error", "messages": [["execution_interrupted", {"prompt_id": pid}]]}}
        if self.mode == "fail":
            return json.loads(json.dumps(self.failed).replace("PID", pid))
        g = job["graph"]
        is_, kps = self.scores(g)
        return {"outputs": {
            "5": {"images": [{"filename": f"{g['5']['inputs']['filename_prefix']}_00001_.png", "subfolder": "",
                              "type": "output"}]},
            "8": {"text": [kps_report(is_, kps)]},
            "9": {"text": [f"/loras/{g['9']['inputs']['name']}.safetensors"]}},
            "status": {"status_str": "success", "completed": True, "messages": []}}

    def websocket(self, h):
        key = h.headers["Sec-WebSocket-Key"]
        digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        accept = base64.b64encode(digest).decode()
        cid = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)["clientId"][0]
        with self.lock:  # logged before the handshake answer: once the client has it, its post may come at once
            self.log.append(("ws", cid))
        h.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        with self.lock:
            self.sockets[cid] = h.connection
            h.connection.sendall(ws_frame({"type": "status",
                                           "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": cid}}))
        try:
            while h.rfile.read(1):  # held open until the client closes it
                pass
        except OSError:
            pass
        h.close_connection = True


@pytest.fixture
def fakes():
    made = []

    def make(n=1):
        new = [FakeComfy() for _ in range(n)]
        made.extend(new)
        return new

    yield make
    for f in made:
        f.close()


@pytest.fixture
def fake(fakes):
    return fakes(1)[0]


@pytest.fixture
def quick(monkeypatch):
    """Down in 0.1 s instead of 3.5, probes every 0.3 s: the same logic on a test's clock."""
    monkeypatch.setattr(queue_client, "RETRY_DELAYS", (0.05, 0.05))
    monkeypatch.setattr(dispatch, "PROBE_EVERY", 0.3)


@pytest.fixture
def wf(tmp_path):
    p = tmp_path / "wf.api.json"
    p.write_text(json.dumps(GRAPH))
    return str(p)


def posted(f: FakeComfy) -> list[dict]:
    return [f.jobs[p]["graph"] for p in f.order if f.jobs[p]["client"] != "someone"]


def test_sweep_posts_every_combination_and_reports_outputs(fake, wf, tmp_path, capsys):
    out = tmp_path / "runs.json"
    rc = cli.main([wf, "--server", fake.url, "--poll", "--set", "CAT_LoraTrainer.steps=50",
                   "--sweep", "3.cat_factor=0,0.5,1", "--sweep", "3.class_word=dog,cat", "--out", str(out)])
    assert rc == 0
    graphs = posted(fake)
    assert len(graphs) == 6  # 3 x 2 combinations
    assert sorted((g["3"]["inputs"]["cat_factor"], g["3"]["inputs"]["class_word"]) for g in graphs) == \
        sorted((f, w) for f in (0, 0.5, 1) for w in ("dog", "cat"))
    assert all(g["4"]["inputs"]["steps"] == 50 for g in graphs)  # typed by /object_info: an int, not "50"
    assert GRAPH["4"]["inputs"]["steps"] == 600  # the loaded workflow is never mutated
    runs = json.loads(out.read_text())
    assert [r["overrides"]["3.cat_factor"] for r in runs] == [0, 0, 0.5, 0.5, 1, 1]
    assert runs[2]["outputs"][0]["path"] == "output/cat_cat_factor0.5_class_worddog_00001_.png"
    assert runs[2]["outputs"][2]["value"] == "/loras/lora_cat_factor0.5_class_worddog.safetensors"
    assert "output/cat_cat_factor1_class_wordcat_00001_.png" in capsys.readouterr().out


def test_every_run_gets_its_own_file_names(fake, wf, tmp_path):
    """Save names carry the swept values, so no run overwrites (or numbers after) another's files; a name the
    user sets stays as set, and --keep-names leaves the graph's names alone."""
    assert cli.main([wf, "--server", fake.url, "--poll", "--sweep", "3.cat_factor=0,0.5", "--sweep",
                     "4.steps=10,20"]) == 0
    names = [(g["9"]["inputs"]["name"], g["4"]["inputs"]["checkpoint_name"], g["5"]["inputs"]["filename_prefix"],
              g["6"]["inputs"]["filename_prefix"]) for g in posted(fake)]
    assert names[0] == ("lora_cat_factor0_steps10", "ckpt_cat_factor0_steps10", "cat_cat_factor0_steps10",
            "cat2_cat_factor0_steps10")
    assert len({n for row in names for n in row}) == 16  # 4 runs x 4 naming inputs, all different
    fake.reset()
    assert cli.main([wf, "--server", fake.url, "--poll", "--sweep", "3.cat_factor=0,0.5", "--set", "9.name=mine"]) == 0
    assert [g["9"]["inputs"]["name"] for g in posted(fake)] == ["mine", "mine"]
    assert [g["5"]["inputs"]["filename_prefix"] for g in posted(fake)] == ["cat_cat_factor0", "cat_cat_factor0.5"]
    fake.reset()
    assert cli.main([wf, "--server", fake.url, "--poll", "--sweep", "3.cat_factor=0,0.5", "--keep-names"]) == 0
    assert [g["9"]["inputs"]["name"] for g in posted(fake)] == ["lora", "lora"]


def test_server_down_is_a_clear_error(wf, capsys, quick):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main([wf, "--server", f"http://127.0.0.1:{port}", "--poll"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach ComfyUI at http://127.0.0.1:{port}" in err and "main.py" in err


@pytest.mark.parametrize("override, message", [
    ("--set=99.steps=1", "the workflow has no node '99'; its nodes are: 1 (CheckpointLoaderSimple)"),
    ("--set=4.stepz=1", "node 4 (CAT_LoraTrainer) has no input 'stepz'; its inputs are: checkpoint_name, "
                        "loss_config, model, resume_from, steps."),
    ("--set=SaveImage.filename_prefix=x", "node type 'SaveImage' occurs 2 times (ids 5, 6)"),
    ("--set=steps", "must look like NODE.input=value"),
    # probe: replaced the link with text, and the server failed with "'str' object has no attribute 'model'"
    ("--set=4.model=abc", "4.model takes a MODEL from another node (a link in the graph), not a value"),
    # probe: refused by the server only after run 1 had trained
    ("--sweep=3.cat_factor=0,a,1", "3.cat_factor='a': not a number (the input is FLOAT)"),
    ("--sweep=3.cat_factor=0,11", "3.cat_factor='11': outside the input's range [0.0, 10.0]"),
    ("--sweep=4.steps=10,2.5", "4.steps='2.5': not an integer (the input is INT)"),
    ("--sweep=3.preservation=class,nope", "3.preservation='nope': not one of the server's choices: 'class', 'none'"),
    ("--sweep=3.cat_factor=0,1,0", "the value(s) '0' occur more than once"),
    ("--set=1.ckpt_name=y.safetensors",
     "1.ckpt_name='y.safetensors': not one of the server's choices: 'x.safetensors'"),
])
def test_bad_overrides_are_named_before_anything_is_posted(fake, wf, capsys, override, message):
    assert cli.main([wf, "--server", fake.url, "--poll", override]) == 2
    assert message in capsys.readouterr().err
    assert fake.order == []  # nothing was queued


def test_a_1000_value_sweep_is_refused_without_a_request(fake, wf, capsys):
    values = ",".join(str(i / 100) for i in range(1000))
    t0 = time.monotonic()
    assert cli.main([wf, "--server", fake.url, "--sweep", f"3.cat_factor={values}"]) == 2
    assert time.monotonic() - t0 < 1.0
    err = capsys.readouterr().err
    assert "the sweep makes 1000 runs (1000 values), more than --max-runs 64" in err and "--max-runs 1000" in err
    assert fake.log == [] and fake.order == []
    assert cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,1", "--sweep", "4.steps=1,2,3", "--max-runs",
                     "5"]) == 2
    assert "makes 6 runs (2 x 3 values)" in capsys.readouterr().err
    assert cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,1", "--max-runs", "2", "--dry-run"]) == 0


@pytest.mark.parametrize("args, message", [
    (["--timeout", "-1"], "-1 must be 0 (no limit) or a positive number of seconds"),
    (["--timeout", "nan"], "must be 0 (no limit) or a positive number"),
    (["--per-server", "0"], "0 must be 1 or more"),
    (["--max-runs", "0"], "0 must be 1 or more"),
])
def test_bad_numbers_are_refused_by_the_parser(wf, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main([wf, *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8188", "http://", "file:///tmp/x"])
def test_a_server_url_that_is_not_http_is_refused_at_once(wf, capsys, url):
    t0 = time.monotonic()
    assert cli.main([wf, "--server", url]) == 2
    assert time.monotonic() - t0 < 0.5  # the probe waited 30 s, then said "cannot reach"
    err = capsys.readouterr().err
    assert "is not an http:// or https:// URL of a ComfyUI server" in err and "cannot reach" not in err


def test_missing_node_type_and_rejected_prompt(fake, wf, capsys):
    fake.info = {k: v for k, v in INFO.items() if k != "CAT_LoraTrainer"}
    assert cli.main([wf, "--server", fake.url, "--poll"]) == 2
    assert "no node type(s) CAT_LoraTrainer. Install ComfyUI-CAT" in capsys.readouterr().err
    fake.info = INFO
    assert cli.main([wf, "--server", fake.url, "--poll", "--set", "4.steps=-1"]) == 1  # the run failed, as one that ran
    out = capsys.readouterr().out
    assert "FAILED: ComfyUI refused the workflow (400)" in out and ("node 4 (CAT_LoraTrainer): Value smaller than "
                                                                    "min: steps: -1 < 1") in out


def test_ui_format_refused(tmp_path, capsys):
    p = tmp_path / "ui.json"
    p.write_text(json.dumps({"nodes": [], "links": []}))
    assert cli.main([str(p)]) == 2
    assert "UI-format workflow; queue needs the API format" in capsys.readouterr().err


def test_cli_dispatch(fake, wf):
    from cat_train.__main__ import main
    assert main(["queue", wf, "--server", fake.url, "--poll", "--dry-run"]) == 0
    assert fake.order == []


ERROR_EVENTS = [{"type": "execution_start", "data": {"prompt_id": "PID"}},
                {"type": "execution_error",
                 "data": {"prompt_id": "PID", "node_id": "1", "exception_message": "not in list"}}]


@pytest.mark.parametrize("events, delay", [(ERROR_EVENTS, 0.0), ([], 0.0), ([], 0.5)],
                         ids=["error-event", "no-event", "no-event-late-history"])
def test_prompt_that_fails_at_once_is_reported_within_5s(fake, wf, capsys, events, delay):
    """A bad checkpoint fails in 0.1 s. The websocket is opened (under the posting client id) before the
    post, and /history is read whatever the websocket says: the failure is reported whether its event
    arrives, never arrives, or the history entry shows up only after the post."""
    fake.mode, fake.events, fake.duration = "fail", events, (lambda g: delay)
    t0 = time.monotonic()
    rc = cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,1"])
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    assert rc == 1 and elapsed < 5.0, (rc, elapsed, out)
    assert out.count("FAILED: node 1 (CheckpointLoaderSimple): Value not in list: ckpt_name") == 2
    ws = [e for e in fake.log if e[0] == "ws"]
    assert len(ws) == 1 and fake.log[0] == ws[0]  # connected once, before the first post
    assert {cid for _, cid in fake.log} == {ws[0][1]}  # posts carry the websocket's client id
    if events:  # the event path does not wait for the next /history read
        assert elapsed < 1.5, elapsed


def test_progress_over_the_websocket(fake, wf, capsys):
    fake.duration = lambda g: 0.6  # history entry appears after the events
    # ComfyUI's order: execution_start (tagged) before the trainer's untagged broadcasts. Without it the broadcast's
    # owner was known only from a /queue read, which raced the event (it failed once in CI)
    fake.events = [{"type": "status", "data": {"status": {}}},
                   {"type": "execution_start", "data": {"prompt_id": "PID"}},
                   {"type": "progress", "data": {"prompt_id": "other", "node": "99", "value": 1, "max": 9}},
                   {"type": "crystools.monitor", "data": {"cpu": 3}},  # another extension's broadcast
                   {"type": "cat.train.progress", "data": {"step": 2, "total": 50, "loss": 0.25,  # broadcast, untagged
                                                           "fit": 0.2, "keep": 0.05}},
                   b"\x00" * 70000,  # a preview image: a binary frame with a 64-bit length
                   {"type": "progress", "data": {"prompt_id": "PID", "node": "4", "value": 50, "max": 50}},
                   {"type": "execution_success", "data": {"prompt_id": "PID"}}]
    assert cli.main([wf, "--server", fake.url]) == 0
    out = capsys.readouterr().out
    assert "train step 2/50 loss 0.25000 (fit 0.20000, keep 0.050000)" in out
    assert "node 4: 50/50" in out and "node 99:" not in out and "cpu" not in out  # another prompt's events are not ours
    assert "node 5: output/cat_00001_.png" in out


def test_no_progress_times_out_and_a_lost_prompt_is_posted_again(fake, wf, capsys):
    fake.mode = "stuck"  # listed as running, never finishes, sends nothing
    t0 = time.monotonic()
    assert cli.main([wf, "--server", fake.url, "--timeout", "1"]) == 1
    assert time.monotonic() - t0 < 4
    out = capsys.readouterr().out
    assert "made no progress for 1s; interrupted it" in out
    assert fake.interrupts == [fake.order[0]]  # the stuck prompt does not keep the server busy
    fake.mode = "lost"  # neither queued nor in /history: the server was restarted
    fake.reset()
    t0 = time.monotonic()
    assert cli.main([wf, "--server", fake.url]) == 1
    assert time.monotonic() - t0 < 8
    out = capsys.readouterr().out
    assert "no longer knows prompt" in out and "posting it again" in out
    assert len(fake.order) == dispatch.MAX_ATTEMPTS  # then it counts as failed
    assert f"FAILED: posted {dispatch.MAX_ATTEMPTS} times" in out


def test_default_timeout_is_minutes_not_a_day(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "Default 600s" in " ".join(capsys.readouterr().out.split())  # argparse wraps the help text


def test_runs_spread_over_servers_one_at_a_time(fakes, wf, tmp_path):
    a, b = fakes(2)
    a.duration = b.duration = lambda g: 0.4
    listed = tmp_path / "servers.txt"
    listed.write_text(f"# the GPU box\n{b.url}\n\n")
    assert cli.main([wf, "--server", a.url, "--server-file", str(listed), "--sweep", "3.cat_factor=0,1,2,3",
                     "--out", str(tmp_path / "runs.json")]) == 0
    assert len(posted(a)) >= 1 and len(posted(b)) >= 1 and len(posted(a)) + len(posted(b)) == 4
    assert a.max_ours == 1 and b.max_ours == 1  # one run at a time per server by default
    spans = [[(j["start"], j["end"]) for j in f.jobs.values()] for f in (a, b)]
    assert any(s0 < e1 and s1 < e0 for s0, e0 in spans[0] for s1, e1 in spans[1])  # both servers trained at once
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert {r["server"] for r in runs} == {a.url, b.url}


def test_the_shortest_queue_gets_the_run(fakes, wf):
    a, b = fakes(2)
    a.add(GRAPH, seconds=30)
    a.add(GRAPH, seconds=30)  # someone else's: one running, one waiting
    assert cli.main([wf, "--server", a.url, "--server", b.url, "--poll"]) == 0
    assert posted(a) == [] and len(posted(b)) == 1
    a.reset()
    b.reset()
    b.add(GRAPH, seconds=30)
    for _ in range(3):
        b.add(GRAPH, seconds=30)
    assert cli.main([wf, "--server", b.url, "--server", a.url, "--poll", "--per-server", "2",
                     "--sweep", "3.cat_factor=0,1"]) == 0
    assert len(posted(a)) == 2 and posted(b) == []


def test_a_server_that_stops_answering_loses_its_run_to_another(fakes, wf, tmp_path, capsys, quick):
    a, b = fakes(2)
    a.duration = lambda g: 30.0  # would run long on a ...
    b.duration = lambda g: 0.3
    b.add(GRAPH, seconds=0.5)  # ... which gets the first run (b is busy with someone else's)
    out = tmp_path / "runs.json"
    th = threading.Thread(target=lambda: (time.sleep(1.0), a.go_down()))
    th.start()
    rc = cli.main([wf, "--server", a.url, "--server", b.url, "--sweep", "3.cat_factor=0,1", "--out", str(out)])
    th.join()
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"server {a.url} marked down" in text and "will be posted again" in text
    runs = json.loads(out.read_text())
    assert [r["ok"] for r in runs] == [True, True] and {r["server"] for r in runs} == {b.url}
    assert max(r["attempts"] for r in runs) == 2


def test_a_server_that_comes_back_gets_the_run_again(fake, wf, tmp_path, capsys, quick):
    fake.duration = lambda g: 1.0
    th = threading.Thread(target=lambda: (time.sleep(0.4), fake.go_down(), time.sleep(1.0), fake.come_back()))
    th.start()
    rc = cli.main([wf, "--server", fake.url, "--out", str(tmp_path / "runs.json")])
    th.join()
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "marked down" in text and f"server {fake.url} is back" in text
    assert len(fake.order) == 1  # the restarted server holds the re-posted run only
    assert json.loads((tmp_path / "runs.json").read_text())[0]["attempts"] == 2


def test_one_http_500_on_history_is_retried(fake, wf, capsys, quick):
    fake.history_500 = 1  # the probe: the follow ended at the first 500, with no retry
    assert cli.main([wf, "--server", fake.url, "--poll"]) == 0
    assert fake.history_500 == 0 and len(fake.order) == 1
    assert "marked down" not in capsys.readouterr().out


def test_journal_after_every_run_then_stop_and_resume(fake, wf, tmp_path, capsys, quick):
    out = tmp_path / "runs.json"
    seen = []

    def on_post(f):  # the journal as it is when the next run is posted
        seen.append(json.loads(out.read_text()) if out.exists() else None)
        if len(seen) == 2:
            f.go_down()  # the server dies before run 2 lands and never comes back
    fake.on_post = on_post
    rc = cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,0.5,1", "--out", str(out), "--timeout", "1.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "no server answered for 2s; 2 run(s) not finished" in err
    assert seen[0] is None and [r["run"] for r in seen[1]] == [1]  # written as soon as run 1 finished
    assert [(r["run"], r["ok"]) for r in json.loads(out.read_text())] == [(1, True)]  # what finished, and only that
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no temporary left behind
    fake.on_post = None
    fake.come_back()
    rc = cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,0.5,1", "--out", str(out), "--resume"])
    text = capsys.readouterr().out
    assert rc == 0 and "resume: 1 of 3 run(s) already finished" in text
    assert [g["3"]["inputs"]["cat_factor"] for g in posted(fake)] == [0.5, 1]  # only what was missing
    assert [(r["run"], r["ok"]) for r in json.loads(out.read_text())] == [(1, True), (2, True), (3, True)]
    fake.reset()
    assert cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,0.5,1", "--out", str(out), "--resume"]) == 0
    assert fake.order == []


def test_table_and_chart_mark_the_best_balanced_run(fake, wf, tmp_path, capsys):
    from PIL import Image

    table = {0: (0.9, 0.05), 0.5: (0.8, 0.12), 1: (0.6, 0.14)}  # best IS / balanced / best KPS
    fake.scores = lambda g: table[g["3"]["inputs"]["cat_factor"]]
    out = tmp_path / "runs.json"
    assert cli.main([wf, "--server", fake.url, "--poll", "--sweep", "3.cat_factor=0,0.5,1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(float(r["IS"]), float(r["KPS"])) for r in rows] == list(table.values())  # read from the report text
    assert [r["best"] for r in rows] == ["", "best", ""]
    assert float(rows[0]["PS"]) == 0.25 and rows[1]["3.cat_factor"] == "0.5" and rows[1]["server"] == fake.url
    md = out.with_suffix(".md").read_text()
    assert "| run | 3.cat_factor | status | server | seconds | PS | IS | KPS | best |" in md
    assert "| 2 | 0.5 | ok |" in md and "| 1 | 0 | ok |" in md
    assert "best = the run whose weaker score is strongest" in md
    assert md.split("\n| 2 |")[1].split("\n")[0].endswith("| 0.8000 | 0.1200 | best |")
    assert "| 2 | 0.5 | ok |" in capsys.readouterr().out  # printed as well
    img = Image.open(out.with_suffix(".png"))
    assert img.size == (720, 460)
    px = img.convert("RGB").getcolors(1 << 20)
    assert len(px) > 20  # drawn, not blank


def test_best_balanced_rule():
    assert best_balanced({1: (0.9, 0.05), 2: (0.8, 0.12), 3: (0.6, 0.14)}) == 2
    assert best_balanced({1: (0.9, 0.14), 2: (0.8, 0.12)}) == 1  # better on both: always wins
    assert best_balanced({1: (0.5, 0.1), 2: (0.5, 0.1)}) == 1  # a tie: the earlier run
    assert best_balanced({1: (0.5, math.nan), 2: (0.4, 0.1)}) == 2  # a run without both scores is left out
    assert best_balanced({1: (0.7, 0.1)}) == 1 and best_balanced({}) is None
    # equal KPS everywhere: KPS counts 1 for all, so IS decides
    assert best_balanced({1: (0.6, 0.1), 2: (0.7, 0.1)}) == 2


def test_the_names_docs_batch_md_gives_for_python_are_importable_from_the_package():
    """docs/batch.md 'In code' names cat_train.queue.plan_runs, Sweep, sweep_table and best_balanced: scripts
    written against those lines keep working with the code in the package's modules."""
    import cat_train.queue as pkg
    from cat_train.queue import plan, report

    named = set(re.findall(r"`(?:cat_train\.queue\.)?(\w+)[`(]", (ROOT / "docs" / "batch.md").read_text()
                           .split("## In code", 1)[1].strip().split("\n\n")[0]))
    assert named == {"plan_runs", "Sweep", "sweep_table", "best_balanced"}
    assert sorted(pkg.__all__) == sorted(named)
    assert (pkg.plan_runs, pkg.Sweep, pkg.sweep_table, pkg.best_balanced) == \
        (plan.plan_runs, dispatch.Sweep, report.sweep_table, report.best_balanced)


def test_leak_scan_report_is_read():
    from cat_train.measure import leak

    ranked = leak.rank_probes(["a photo of a dog", "a photo of a cat"], [[0.9, 0.8], [0.5, 0.7]])
    entry = {"outputs": {"13": {"text": [leak.report(ranked, leak.worst_probes(ranked, 1))]},
                         "23": {"text": [kps_report(0.7, 0.11) + "\nIS masked 0.9000 (identity on the subject only)"]}}}
    graph = {"13": {"class_type": "CAT_LeakScan"}, "23": {"class_type": "CAT_KPSEvaluator"}}
    s = scores_of(entry, graph)
    assert s["13"] == {"max_drift": pytest.approx(0.4), "worst_probe": "a photo of a cat"}
    assert s["23"] == {"KPS": 0.11, "PS": 0.25, "IS": 0.7}


def test_ctrl_c_cancels_only_our_prompts_and_writes_what_finished(fakes, wf, tmp_path):
    """The probe: Ctrl-C ended in a traceback, left the running prompt going and wrote no --out."""
    a, b = fakes(2)
    for f in (a, b):
        f.duration = lambda g: 0.2 if g["4"]["inputs"]["steps"] == 1 else 60.0
    foreign = a.add(GRAPH, seconds=60)  # someone else's prompt runs on a: ours waits behind it
    out = tmp_path / "runs.json"
    proc = subprocess.Popen([sys.executable, "-m", "cat_train", "queue", wf, "--server", a.url, "--server", b.url,
                             "--sweep", "4.steps=1,1000,2000", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 30
        while not (len(posted(b)) == 2 and len(posted(a)) == 1 and out.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(posted(b)) == 2 and len(posted(a)) == 1, (posted(a), posted(b))
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted: cancelling this sweep's prompts" in stderr
    ours_a, ours_b = [p for p in a.order if p != foreign], b.order
    assert a.deletes == ours_a and a.interrupts == []  # ours was queued: deleted; the running one is not ours
    assert a.jobs[foreign]["state"] is None and a.where(a.jobs[foreign], time.monotonic()) == "running"
    assert b.interrupts == [ours_b[1]] and b.jobs[ours_b[1]]["state"] == "interrupted"
    runs = json.loads(out.read_text())
    assert [(r["run"], r["ok"], r["overrides"]) for r in runs] == [(1, True, {"4.steps": 1})]
    assert "wrote" in stderr and "1 finished run(s)" in stderr


def test_out_must_not_name_the_table(fake, wf, tmp_path, capsys):
    assert cli.main([wf, "--server", fake.url, "--out", str(tmp_path / "runs.md")]) == 2
    assert "names the journal (runs.json); the table and chart are written beside it" in capsys.readouterr().err
    assert cli.main([wf, "--server", fake.url, "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert fake.order == []


# -- issue 32, round two: losses, a hang, raw and misleading answers of the queue CLI


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder nothing can be written in: mode 0555, and for root (who writes there anyway) every open for
    writing under it fails with EROFS, as on a read-only mount."""
    import builtins
    import errno

    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        real_open, real_os_open = builtins.open, os.open

        def refuse(path):
            if str(path).startswith(str(d)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))

        def fake_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+"):
                refuse(file)
            return real_open(file, mode, *a, **k)

        def fake_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_os_open(path, flags, *a, **k)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
    yield d
    d.chmod(0o755)


def test_an_out_folder_that_cannot_be_written_is_named_before_anything_is_posted(fake, wf, read_only_dir, capsys):
    """The probe: run 1 trained, then a traceback at the journal write; run 1 unrecorded, run 2 never posted."""
    out = read_only_dir / "runs.json"
    assert cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot write in {read_only_dir}" in err and "nothing was posted" in err, err
    assert fake.order == [] and fake.log == []  # not one post, not even the websocket
    assert cli.main([wf, "--server", fake.url, "--out", str(read_only_dir / "sub" / "runs.json"), "--dry-run"]) == 2
    assert "cannot write in" in capsys.readouterr().err
    nested = read_only_dir.parent / "new" / "deeper" / "runs.json"  # a dry run checks, and leaves no folder behind
    assert cli.main([wf, "--server", fake.url, "--out", str(nested), "--dry-run"]) == 0
    assert not (read_only_dir.parent / "new").exists()
    assert cli.main([wf, "--server", fake.url, "--out", str(read_only_dir.parent), "--dry-run"]) == 2
    assert "is a folder; name the journal file in it" in capsys.readouterr().err


def test_a_journal_that_cannot_be_written_mid_sweep_loses_no_run(fake, wf, tmp_path, monkeypatch, capsys):
    """A disk that fills up after the start: the sweep goes on (run 2 is posted), and the records are printed."""
    import errno

    from cat_train.queue import journal

    calls = []

    def full(path, records):
        calls.append(len(records))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dispatch, "write_journal", full)
    monkeypatch.setattr(cli, "write_journal", full)
    out = tmp_path / "runs.json"
    rc = cli.main([wf, "--server", fake.url, "--poll", "--sweep", "3.cat_factor=0,1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and len(posted(fake)) == 2, captured
    assert captured.out.count("cannot write the journal") == 1  # said once, not after every run
    assert f"error: cannot write the journal {out} (No space left on device)" in captured.err
    printed = json.loads(captured.out[captured.out.index("[\n"):captured.out.index("\n]\n") + 2])
    assert [(r["run"], r["ok"]) for r in printed] == [(1, True), (2, True)]  # every finished run, in the output
    assert calls[-1] == 2 and journal.write_journal is not full


def test_history_answering_500_for_a_while_does_not_post_the_run_again(fake, wf, tmp_path, capsys):
    """The probe: /history answering 500 for a few seconds: "cannot reach ... start it", the run posted again (3
    times in all) and a run that had succeeded (LoRA saved) recorded as failed, so --resume would train it again."""
    fake.duration = lambda g: 1.0
    threading.Timer(0.3, lambda: setattr(fake, "history_500", 12)).start()  # 3 reads of 4 tries each, ~5 s
    out = tmp_path / "runs.json"
    rc = cli.main([wf, "--server", fake.url, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert len(fake.order) == 1  # posted once
    assert "answered GET /history/" in text and "with HTTP 500" in text and "read again" in text
    assert "cannot reach" not in text and "marked down" not in text
    [rec] = json.loads(out.read_text())
    assert rec["ok"] is True and rec["attempts"] == 1 and rec["prompt_id"] == fake.order[0]
    assert rec["outputs"][-1]["value"] == "/loras/lora.safetensors"


def test_history_that_never_answers_records_the_result_as_unknown_not_failed(fake, wf, tmp_path, capsys, quick):
    fake.history_500 = 10 ** 9
    out = tmp_path / "runs.json"
    t0 = time.monotonic()
    assert cli.main([wf, "--server", fake.url, "--out", str(out), "--timeout", "1.5"]) == 1
    assert time.monotonic() - t0 < 10
    text = capsys.readouterr().out
    assert len(fake.order) == 1 and "RESULT UNKNOWN" in text
    [rec] = json.loads(out.read_text())
    assert rec["unknown"] is True and rec["ok"] is False and "whether it succeeded is unknown" in rec["error"]
    assert "unknown: prompt" in out.with_suffix(".md").read_text() if out.with_suffix(".md").exists() else True


def test_a_dry_run_of_a_million_runs_prints_its_first_run_at_once(fake, wf, monkeypatch):
    """The probe: --max-runs 1000000 --dry-run on a 10^6 grid printed nothing for 15 minutes (5 GB, every run built
    three times before the first line). Runs are now checked per value and printed as they are built."""
    class Enough(Exception):
        pass

    def first_lines(sweeps: list[str], stop: str) -> tuple[float, list[str]]:
        """Seconds until the line holding `stop` is printed (the run is stopped there), and the lines so far."""
        lines, result, t0 = [], {}, time.monotonic()

        class Out:
            def write(self, text):
                lines.append(text)
                if stop in text:
                    result["t"] = time.monotonic() - t0
                    raise Enough

            def flush(self):
                pass

        def go():
            try:
                cli.main([wf, "--server", fake.url, *sweeps, "--max-runs", "1000000", "--dry-run"])
            except Enough:
                pass
        monkeypatch.setattr(sys, "stdout", Out())
        th = threading.Thread(target=go, daemon=True)  # a thread: a regression fails in 30 s, not in 15 minutes
        th.start()
        th.join(30)
        monkeypatch.undo()
        assert "t" in result, f"{stop!r} not printed within 30 s; printed: {''.join(lines)[:300]!r}"
        return result["t"], "".join(lines).splitlines()

    big = ["--sweep", "3.class_word=" + ",".join(f"w{i}" for i in range(10000)),
           "--sweep", "4.steps=" + ",".join(str(i) for i in range(1, 11)),
           "--sweep", "3.cat_factor=" + ",".join(str(i) for i in range(10))]
    took, lines = first_lines(big, "run 3/")
    small, _ = first_lines(["--sweep", "3.cat_factor=0,1,2"], "run 3/")
    print(f"first 3 runs of 10^6: {took:.2f}s; of 3: {small:.2f}s")
    assert lines[0] == "dry run: 1000000 run(s); nothing is posted"
    assert lines[1] == 'run 1/1000000 {"3.class_word": "w0", "4.steps": 1, "3.cat_factor": 0.0}'
    assert took < 5.0 and took < 20 * small + 1.0, (took, small)
    assert fake.order == []


@pytest.mark.parametrize("content, message", [
    (b"not a url\n", "line 1: 'not a url' has spaces in it, so it is not a URL"),
    (b"# GPU box\nhttp://[::1:8388\n", "line 2: 'http://[::1:8388' is not a valid URL (Invalid IPv6 URL); an IPv6 "
                                        "address goes in brackets before the port, e.g. http://[::1]:8188"),
    (bytes(range(256)), "is not a text file (byte 128: invalid start byte)"),
    (b"http://127.0.0.1:8188\x00\n", "is not a text file (byte 21: a NUL byte)"),
    (b"", "holds no server URL (only blank lines and # comments)"),
    (b"# nothing yet\n\n", "holds no server URL"),
    (b"http://127.0.0.1:8188 http://127.0.0.1:8189\n", "line 1: 'http://127.0.0.1:8188 http://127.0.0.1:8189' holds 2 "
                                                      "URLs: give one URL per --server, or one a line in a "
                                                      "--server-file"),
    (b"http://bad_host!:8188\n", "'bad_host!' is not a host name or address"),
], ids=["not-a-url", "ipv6-open-bracket", "binary", "nul", "empty", "comments-only", "two-urls", "bad-host"])
def test_a_malformed_server_file_is_named_with_its_line_before_any_request(tmp_path, wf, capsys, content, message):
    """The probe: tracebacks (InvalidURL, ValueError, UnicodeDecodeError), 'invalid port' for two URLs on a line, and an
    empty file that silently meant http://127.0.0.1:8188 ("cannot reach" after 3.5 s of retries)."""
    f = tmp_path / "servers.txt"
    f.write_bytes(content)
    t0 = time.monotonic()
    assert cli.main([wf, "--server-file", str(f), "--dry-run"]) == 2
    assert time.monotonic() - t0 < 0.5
    err = capsys.readouterr().err
    assert f"--server-file {f}" in err and message in err, err
    assert "cannot reach" not in err


def test_a_server_file_written_with_a_byte_order_mark_is_read(fake, tmp_path, wf, capsys):
    """The probe: "'\\ufeffhttp://...' is not an http:// or https:// URL" for a file Notepad saved."""
    f = tmp_path / "servers.txt"
    f.write_bytes(b"\xef\xbb\xbf" + fake.url.encode() + b"\r\n")
    assert cli.main([wf, "--server-file", str(f), "--dry-run"]) == 0
    assert cli.main([wf, "--server", "\ufeff" + fake.url, "--dry-run"]) == 2  # on the command line it is named
    assert "holds characters that are not text" in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    (("text/html; charset=utf-8", b"<!doctype html><html><body>Sign in</body></html>"),
     "answered GET /object_info with text/html ('<!doctype html><html><body>Sign in</body></html>'), not ComfyUI's "
     "JSON"),
    (("application/json", b'{"detail": "Not Found"}'), "answered GET /object_info with JSON that is not ComfyUI's "
                                                       "node list"),
    (("application/json", b"[]"), "JSON that is not ComfyUI's node list"),
], ids=["html", "other-json", "empty-list"])
def test_an_object_info_that_is_not_comfyuis_is_named(fake, wf, capsys, body, message):
    """The probe: TypeError: 'NoneType' object is not iterable."""
    fake.info_body = body
    assert cli.main([wf, "--server", fake.url]) == 2
    err = capsys.readouterr().err
    assert message in err and "pass --server with the address ComfyUI prints at start" in err, err
    assert fake.order == []


def test_timeout_bounds_the_wait_for_a_slow_server(fake, wf, capsys):
    """The probe: --timeout 20 against a server that takes the connection and does not answer: 124 s (4 tries of 30 s),
    then "cannot reach ... start it"."""
    fake.info_delay = 120.0
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("rc",
                                                           cli.main([wf, "--server", fake.url, "--timeout", "2"])),
                          daemon=True)
    t0 = time.monotonic()
    th.start()
    th.join(60)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert result.get("rc") == 2 and took < 2 + 4, (took, err)
    assert f"ComfyUI at {fake.url} took the connection but did not answer GET /object_info within 2 s" in err
    assert "pass a larger --timeout" in err and "cannot reach" not in err


def test_a_warning_the_server_sends_as_it_queues_is_printed_under_its_run(fake, wf, tmp_path, capsys):
    """The probe: a LoRA of another family on a stock loader was said in the server's log and the browser only."""
    warning = ("node 10 (LoraLoader): LoRA cat_sd15.safetensors was trained for SD1.x/SD2, but the model it is "
               "applied to (xl.safetensors) is SDXL")
    fake.duration = lambda g: 0.3
    fake.events = [{"type": "cat.warning", "data": {"title": "LoRA for another model family", "warnings": [warning],
                                                    "prompt_id": "PID"}},
                   {"type": "cat.warning", "data": {"title": "LoRA for another model family", "warnings": ["someone"],
                                                    "prompt_id": "not-ours"}}]
    out = tmp_path / "runs.json"
    assert cli.main([wf, "--server", fake.url, "--sweep", "3.cat_factor=0,1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count(f"[run 1] warning from {fake.url} (LoRA for another model family):\n    {warning}") == 1
    assert text.count(f"[run 2] warning from {fake.url}") == 1
    assert text.count("    someone") == 2  # another prompt's: printed, under no run
    assert [r["warnings"] for r in json.loads(out.read_text())] == [[warning], [warning]]


def test_a_storage_error_is_printed_as_its_message_not_its_errno(fake, wf, capsys):
    """ComfyUI's record of a pack's StorageError: exception_type is a module path, exception_message starts with
    "[Errno 30] "; the CLI printed that errno first."""
    fake.mode = "fail"
    fake.failed = {"outputs": {}, "status": {"status_str": "error", "messages": [["execution_error", {
        "prompt_id": "PID", "node_id": "9", "node_type": "CAT_SaveLora",
        "exception_type": "/srv/ComfyUI/custom_nodes/ComfyUI-CAT.cat_train.adapters.export.StorageError",
        "exception_message": "[Errno 30] loras folder /srv/models/loras cannot be written (Read-only file system); "
                             "free space there, or point ComfyUI's loras folder (extra_model_paths.yaml) "
                             "elsewhere\n"}]]}}
    assert cli.main([wf, "--server", fake.url, "--poll"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: node 9 (CAT_SaveLora): loras folder /srv/models/loras cannot be written (Read-only file " \
           "system)" in out
    assert "Errno" not in out and "cat_train.adapters.export" not in out


def test_the_graphs_own_values_are_checked_against_the_server(fake, wf, tmp_path, capsys):
    """The probe: a dry run passed a graph whose checkpoint the server does not have; a BOOLEAN holding the text
    "false" went out as it was, and ComfyUI ran it as true."""
    info = json.loads(json.dumps(INFO))
    info["CheckpointLoaderSimple"]["python_module"] = "nodes"  # ComfyUI's own node: it checks the list
    info["CAT_Dataset"] = {"python_module": "custom_nodes.ComfyUI-CAT",
                           "input": {"required": {"buckets": ["BOOLEAN", {}]}}}
    info["Other_Picker"] = {"python_module": "custom_nodes.other", "input": {"required": {"pick": [["a", "b"]]}}}
    fake.info = info
    g = json.loads(json.dumps(GRAPH))
    g["1"]["inputs"]["ckpt_name"] = "sd15.safetensors"
    p = tmp_path / "g.api.json"
    p.write_text(json.dumps(g))
    assert cli.main([str(p), "--server", fake.url, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert ("node 1 (CheckpointLoaderSimple) ckpt_name 'sd15.safetensors' is not on the server (it lists "
            "'x.safetensors'); put the file in ComfyUI's models/checkpoints folder (then restart or refresh the "
            "server), or --set 1.ckpt_name=<one it lists>") in err
    # fixed by --set
    assert cli.main([str(p), "--server", fake.url, "--dry-run", "--set", "1.ckpt_name=x.safetensors"]) == 0
    capsys.readouterr()
    g["1"]["inputs"]["ckpt_name"] = "x.safetensors"
    g["20"] = {"class_type": "CAT_Dataset", "inputs": {"buckets": "false"}}
    g["21"] = {"class_type": "Other_Picker", "inputs": {"pick": "c"}}
    p.write_text(json.dumps(g))
    assert cli.main([str(p), "--server", fake.url, "--poll"]) == 0
    out = capsys.readouterr().out
    assert ("note: node 20 (CAT_Dataset) buckets: the text 'false' is sent as false (ComfyUI reads any non-empty "
            "text as true)") in out
    assert "note: node 21 (Other_Picker) pick 'c' is not among the server's choices" in out  # another pack's: a note
    assert posted(fake)[0]["20"]["inputs"]["buckets"] is False
    g["20"]["inputs"]["buckets"] = "no"
    p.write_text(json.dumps(g))
    assert cli.main([str(p), "--server", fake.url, "--dry-run"]) == 2
    assert "node 20 (CAT_Dataset) buckets='no': a BOOLEAN input takes true or false" in capsys.readouterr().err
