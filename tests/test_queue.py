"""`python -m cat_train queue` against a fake ComfyUI on 127.0.0.1 (stdlib http.server; no other traffic)."""
from __future__ import annotations

import json
import socket
import threading
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


class Fake(BaseHTTPRequestHandler):
    posted: list = []
    info = INFO

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
        if self.path.startswith("/history/"):
            pid = self.path.rsplit("/", 1)[1]
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
        self.posted.append(body["prompt"])
        self._send(200, {"prompt_id": f"p{len(self.posted) - 1}", "number": 0, "node_errors": {}})


@pytest.fixture
def server(tmp_path):
    Fake.posted = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
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
