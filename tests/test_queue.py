"""`python -m cat_train queue` against a fake ComfyUI on 127.0.0.1 (stdlib http.server with a minimal
websocket at /ws; no other traffic)."""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cat_train import queue as q

GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "3": {"class_type": "CAT_LossConfig", "inputs": {"cat_factor": 1.0, "preservation": "class", "class_word": "dog", "token_weights": ""}},
    "4": {"class_type": "CAT_LoraTrainer", "inputs": {"model": ["1", 0], "loss_config": ["3", 0], "steps": 600}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 2], "filename_prefix": "cat"}},
    "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 2], "filename_prefix": "cat2"}},
}
INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["x.safetensors"]]}}},
    "CAT_LossConfig": {"input": {"required": {"cat_factor": ["FLOAT", {}], "preservation": [["class"]], "class_word": ["STRING", {}],
                                              "token_weights": ["STRING", {}]}}},
    "CAT_LoraTrainer": {"input": {"required": {"model": ["MODEL"], "loss_config": ["CAT_LOSS_CONFIG"], "steps": ["INT", {}]},
                                  "optional": {"resume_from": ["STRING", {}]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}},
}


def ws_frame(payload, binary: bool = False) -> bytes:
    """One unmasked server frame (RFC 6455), with the 16- and 64-bit length forms."""
    data = payload if binary else json.dumps(payload).encode()
    n = len(data)
    length = bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536 else bytes([127]) + struct.pack(">Q", n)
    return bytes([0x82 if binary else 0x81]) + length + data


FAILED = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
    ["execution_start", {"prompt_id": "PID"}],
    ["execution_error", {"prompt_id": "PID", "node_id": "1", "node_type": "CheckpointLoaderSimple",
                         "exception_message": "Value not in list: ckpt_name: 'x.safetensors' not in []"}]]}}


class Fake(BaseHTTPRequestHandler):
    posted: list = []
    info = INFO
    mode = "ok"          # ok: finished at once; fail: failed after fail_delay s; stuck: runs forever; lost: unknown
    fail_delay = 0.0
    events: list = []    # sent on the poster's websocket right after each post ("PID" = the new prompt id)
    log: list = []       # ("ws", client id) / ("post", client id), in order
    sockets: dict = {}
    done_at: dict = {}
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/object_info":
            return self._send(200, self.info)
        if self.path.startswith("/ws"):
            return self._websocket()
        if self.path == "/queue":
            running = [[0, pid, {}, {}, []] for pid, t in self.done_at.items()
                       if self.mode == "stuck" or (self.mode != "lost" and time.monotonic() < t)]
            return self._send(200, {"queue_running": running, "queue_pending": []})
        if self.path.startswith("/history/"):
            pid = self.path.rsplit("/", 1)[1]
            if self.mode in ("stuck", "lost") or time.monotonic() < self.done_at.get(pid, 0):
                return self._send(200, {})
            if self.mode == "fail":
                return self._send(200, {pid: json.loads(json.dumps(FAILED).replace("PID", pid))})
            n = int(pid[1:])
            g = self.posted[n]
            factor = g["3"]["inputs"]["cat_factor"]
            return self._send(200, {pid: {"outputs": {
                "5": {"images": [{"filename": f"cat_{factor}_00001_.png", "subfolder": "cat", "type": "output"}]},
                "7": {"text": [f"/loras/cat_{factor}.safetensors"]}},
                "status": {"status_str": "success", "completed": True, "messages": []}}})
        self._send(404, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"]["4"]["inputs"].get("steps") == -1:  # what ComfyUI answers to an invalid value
            return self._send(400, {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                                              "details": ""},
                                    "node_errors": {"4": {"class_type": "CAT_LoraTrainer", "errors": [
                                        {"message": "Value smaller than min", "details": "steps: -1 < 1"}]}}})
        with self.lock:
            self.log.append(("post", body.get("client_id")))
            self.posted.append(body["prompt"])
            pid = f"p{len(self.posted) - 1}"
            self.done_at[pid] = time.monotonic() + self.fail_delay
        self._send(200, {"prompt_id": pid, "number": 0, "node_errors": {}})
        ws = self.sockets.get(body.get("client_id"))
        for e in self.events:
            frame = ws_frame(e, binary=True) if isinstance(e, bytes) else ws_frame(json.loads(json.dumps(e).replace("PID", pid)))
            with self.lock:
                ws.sendall(frame)

    def _websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        cid = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)["clientId"][0]
        with self.lock:  # logged before the handshake answer: once the client has it, its post may come at once
            self.log.append(("ws", cid))
        self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        with self.lock:
            self.sockets[cid] = self.connection
            self.connection.sendall(ws_frame({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": cid}}))
        while self.rfile.read(1):  # held open until the client closes it
            pass
        self.close_connection = True


@pytest.fixture
def server(tmp_path):
    Fake.posted, Fake.log, Fake.sockets, Fake.done_at, Fake.events = [], [], {}, {}, []
    Fake.mode, Fake.fail_delay = "ok", 0.0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    for sock in list(Fake.sockets.values()):  # a websocket left open would keep server_close waiting
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def wf(tmp_path):
    p = tmp_path / "wf.api.json"
    p.write_text(json.dumps(GRAPH))
    return str(p)


def test_sweep_posts_every_combination_and_reports_outputs(server, wf, tmp_path, capsys):
    out = tmp_path / "runs.json"
    rc = q.main([wf, "--server", server, "--poll", "--set", "CAT_LoraTrainer.steps=50",
                 "--sweep", "3.cat_factor=0,0.5,1", "--sweep", "3.class_word=dog,cat", "--out", str(out)])
    assert rc == 0
    assert len(Fake.posted) == 6  # 3 x 2 combinations
    assert sorted((g["3"]["inputs"]["cat_factor"], g["3"]["inputs"]["class_word"]) for g in Fake.posted) == \
        sorted((f, w) for f in (0, 0.5, 1) for w in ("dog", "cat"))
    assert all(g["4"]["inputs"]["steps"] == 50 for g in Fake.posted)  # JSON-typed: an int, not "50"
    assert GRAPH["4"]["inputs"]["steps"] == 600  # the loaded workflow is never mutated
    runs = json.loads(out.read_text())
    assert [r["overrides"]["3.cat_factor"] for r in runs] == [0, 0, 0.5, 0.5, 1, 1]
    assert runs[2]["outputs"][0]["path"] == "output/cat/cat_0.5_00001_.png"
    assert runs[2]["outputs"][1]["value"] == "/loras/cat_0.5.safetensors"
    assert "output/cat/cat_1_00001_.png" in capsys.readouterr().out


def test_server_down_is_a_clear_error(wf, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert q.main([wf, "--server", f"http://127.0.0.1:{port}", "--poll"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach ComfyUI at http://127.0.0.1:{port}" in err and "main.py" in err


@pytest.mark.parametrize("override, message", [
    ("--set=99.steps=1", "the workflow has no node '99'; its nodes are: 1 (CheckpointLoaderSimple)"),
    ("--set=4.stepz=1", "node 4 (CAT_LoraTrainer) has no input 'stepz'; its inputs are: loss_config, model, resume_from, steps."),
    ("--set=SaveImage.filename_prefix=x", "node type 'SaveImage' occurs 2 times (ids 5, 6)"),
    ("--set=steps", "must look like NODE.input=value"),
])
def test_bad_overrides_are_named(server, wf, capsys, override, message):
    assert q.main([wf, "--server", server, "--poll", override]) == 2
    assert message in capsys.readouterr().err
    assert Fake.posted == []  # nothing was queued


def test_missing_node_type_and_rejected_prompt(server, wf, tmp_path, capsys):
    Fake.info = {k: v for k, v in INFO.items() if k != "CAT_LoraTrainer"}
    try:
        assert q.main([wf, "--server", server, "--poll"]) == 2
        assert "no node type(s) CAT_LoraTrainer. Install ComfyUI-CAT" in capsys.readouterr().err
    finally:
        Fake.info = INFO
    assert q.main([wf, "--server", server, "--poll", "--set", "4.steps=-1"]) == 2
    err = capsys.readouterr().err
    assert "ComfyUI refused the workflow (400)" in err and "node 4 (CAT_LoraTrainer): Value smaller than min: steps: -1 < 1" in err


def test_ui_format_refused(tmp_path, capsys):
    p = tmp_path / "ui.json"
    p.write_text(json.dumps({"nodes": [], "links": []}))
    assert q.main([str(p)]) == 2
    assert "UI-format workflow; queue needs the API format" in capsys.readouterr().err


def test_cli_dispatch(server, wf):
    from cat_train.__main__ import main
    assert main(["queue", wf, "--server", server, "--poll", "--dry-run"]) == 0
    assert Fake.posted == []


ERROR_EVENTS = [{"type": "execution_start", "data": {"prompt_id": "PID"}},
                {"type": "execution_error", "data": {"prompt_id": "PID", "node_id": "1", "exception_message": "not in list"}}]


@pytest.mark.parametrize("events, delay", [(ERROR_EVENTS, 0.0), ([], 0.0), ([], 0.5)],
                         ids=["error-event", "no-event", "no-event-late-history"])
def test_prompt_that_fails_at_once_is_reported_within_5s(server, wf, capsys, events, delay):
    """A bad checkpoint fails in 0.1 s. The websocket is opened (under the posting client id) before the
    post, and /history is read whatever the websocket says: the failure is reported whether its event
    arrives, never arrives, or the history entry shows up only after the post."""
    Fake.mode, Fake.events, Fake.fail_delay = "fail", events, delay
    t0 = time.monotonic()
    rc = q.main([wf, "--server", server, "--sweep", "3.cat_factor=0,1"])
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    assert rc == 1 and elapsed < 5.0, (rc, elapsed, out)
    assert out.count("FAILED: node 1 (CheckpointLoaderSimple): Value not in list: ckpt_name") == 2
    ws = [e for e in Fake.log if e[0] == "ws"]
    assert len(ws) == 1 and Fake.log[0] == ws[0]  # connected once, before the first post
    assert {cid for _, cid in Fake.log} == {ws[0][1]}  # posts carry the websocket's client id
    if events:  # the event path does not wait for the next /history read
        assert elapsed < 1.5, elapsed


def test_progress_over_the_websocket(server, wf, capsys):
    Fake.fail_delay = 0.6  # history entry appears after the events
    Fake.events = [{"type": "status", "data": {"status": {}}},
                   {"type": "progress", "data": {"prompt_id": "other", "node": "9", "value": 1, "max": 9}},
                   {"type": "crystools.monitor", "data": {"cpu": 3}},  # another extension's broadcast
                   {"type": "cat.train.progress", "data": {"step": 2, "total": 50, "loss": 0.25,  # broadcast, untagged
                                                           "fit": 0.2, "keep": 0.05}},
                   b"\x00" * 70000,  # a preview image: a binary frame with a 64-bit length
                   {"type": "progress", "data": {"prompt_id": "PID", "node": "4", "value": 50, "max": 50}},
                   {"type": "execution_success", "data": {"prompt_id": "PID"}}]
    assert q.main([wf, "--server", server]) == 0
    out = capsys.readouterr().out
    assert "train step 2/50 loss 0.25000 (fit 0.20000, keep 0.050000)" in out
    assert "node 4: 50/50" in out and "node 9" not in out and "cpu" not in out  # another prompt's events are not ours
    assert "node 5: output/cat/cat_1.0_00001_.png" in out


def test_no_progress_times_out_and_a_lost_prompt_ends_at_once(server, wf, capsys):
    Fake.mode = "stuck"  # listed as running, never finishes, sends nothing
    t0 = time.monotonic()
    assert q.main([wf, "--server", server, "--timeout", "1"]) == 2
    assert time.monotonic() - t0 < 4
    assert "made no progress for 1s" in capsys.readouterr().err
    Fake.mode = "lost"  # neither queued nor in /history: the server was restarted
    t0 = time.monotonic()
    assert q.main([wf, "--server", server]) == 2
    assert time.monotonic() - t0 < 4
    assert "ComfyUI no longer knows prompt p1" in capsys.readouterr().err


def test_default_timeout_is_minutes_not_a_day(capsys):
    with pytest.raises(SystemExit):
        q.main(["--help"])
    assert "Default 600s" in " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
