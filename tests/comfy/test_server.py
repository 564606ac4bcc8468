"""A real ComfyUI server (main.py --cpu) with this pack: /prompt runs, progress and live-view events
arrive on /ws (followed by `python -m cat_train queue`), the web extension is served."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import COMFY, ROOT
from tiny_models import make_images

HELPER = '''
import sys
sys.path.insert(0, {tests!r})
from comfy_api.latest import ComfyExtension
from tiny_models import register_tiny_open_clip, tiny_checkpoint_node
import folder_paths
TinyCheckpoint = tiny_checkpoint_node()
register_tiny_open_clip(folder_paths.get_folder_paths("clip")[0])  # the shipped KPS Evaluator runs in the browser test

class Ext(ComfyExtension):
    async def get_node_list(self):
        return [TinyCheckpoint]

async def comfy_entrypoint():
    return Ext()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfybase")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-CAT").symlink_to(ROOT)
    (base / "custom_nodes" / "cat_test_models").mkdir()
    (base / "custom_nodes" / "cat_test_models" / "__init__.py").write_text(HELPER.format(tests=str(Path(__file__).parent)))
    make_images(base / "input" / "ds", n=2)
    port = _free_port()
    args = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:  # main.py exits without a frontend; a dummy page is enough for the API
        (base / "fe").mkdir()
        (base / "fe" / "index.html").write_text("<html></html>")
        args += ["--front-end-root", str(base / "fe")]
    log = open(base / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=COMFY, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        # Up when one node's info answers; then all of it, which v0.33 (hundreds more nodes) can take longer than a
        # short timeout to send. The limits only bound a hung server, they claim no speed: a start takes ~7 s on a
        # quiet 2-core machine, and measured 86 s (v0.3.64) and 125 s (v0.33) at load 18 on the shared one.
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({proc.returncode}); log:\n{(base / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/object_info/CAT_LoraTrainer", timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("ComfyUI did not come up within 300 s") from None
                time.sleep(0.5)
        info = json.loads(urllib.request.urlopen(url + "/object_info", timeout=120).read())
        yield url, info, base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def train_graph(steps: int, seed: int, checkpoint_name: str, save_name: str) -> dict:
    """API graph: tiny SD1.x -> CAT Dataset (input/ds) -> loss config -> trainer -> Save CAT LoRA."""
    return {
        "1": {"class_type": "CATTest_TinyCheckpoint", "inputs": {"kind": "sd15"}},
        "2": {"class_type": "CAT_Dataset", "inputs": {"vae": ["1", 2], "clip": ["1", 1], "folder": "ds", "triggers": "sks",
                                                      "class_word": "dog", "caption_extension": ".txt", "resolution": 128, "buckets": True}},
        "3": {"class_type": "CAT_LossConfig", "inputs": {"cat_factor": 1.0, "preservation": "class", "class_word": "dog", "token_weights": ""}},
        "4": {"class_type": "CAT_LoraTrainer", "inputs": {
            "model": ["1", 0], "dataset": ["2", 0], "loss_config": ["3", 0], "rank": 4, "lora_alpha": 4.0, "target": "attn",
            "steps": steps, "learning_rate": 0.01, "lr_schedule": "constant", "batch_size": 1, "grad_accum": 1, "seed": seed,
            "dtype": "auto", "gradient_checkpointing": "auto", "save_every": 0, "checkpoint_name": checkpoint_name, "resume_from": ""}},
        "5": {"class_type": "CAT_SaveLora", "inputs": {"lora": ["4", 1], "name": save_name}},
    }


def test_server_registers_nodes_and_serves_web(server):
    url, info, _ = server
    for nid in ("CAT_Dataset", "CAT_LossConfig", "CAT_LoraTrainer", "CAT_SaveLora", "CAT_KPSEvaluator"):
        assert nid in info, f"{nid} missing from /object_info"
    assert info["CAT_LoraTrainer"]["display_name"] == "CAT LoRA Trainer"
    js = urllib.request.urlopen(url + "/extensions/ComfyUI-CAT/cat_live_view.js", timeout=5).read().decode()
    assert "cat.train.progress" in js


def test_template_browser_lists_only_ui_graphs(server):
    """ComfyUI lists every *.json directly in a pack's workflows/ as a template: the UI graphs, never the API ones
    (those live in workflows/api/), and each listed name is served where the template browser fetches it."""
    url, _, _ = server
    listed = json.loads(urllib.request.urlopen(url + "/workflow_templates", timeout=10).read())
    ui = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    assert len(ui) >= 6 and sorted(listed["ComfyUI-CAT"]) == ui
    assert not [n for n in listed["ComfyUI-CAT"] if n.endswith(".api")]
    for name in ui:
        graph = json.loads(urllib.request.urlopen(f"{url}/api/workflow_templates/ComfyUI-CAT/{name}.json", timeout=10).read())
        assert "nodes" in graph and "links" in graph, f"{name}: not a UI graph"


def test_prompt_runs_with_progress_and_live_events(server, tmp_path, capsys):
    from cat_train.queue import cli

    url, _, base = server
    g = train_graph(steps=3, seed=0, checkpoint_name="srv", save_name="server_run")
    g["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}}
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(g))
    out = tmp_path / "runs.json"
    rc = cli.main([str(wf), "--server", url, "--sweep", "3.cat_factor=0,1", "--out", str(out), "--timeout", "120"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert text.count("train step 3/3") == 2  # our live-view events, over /ws
    assert "node 4: 3/3" in text  # ComfyUI's own progress events for the trainer node
    runs = json.loads(out.read_text())
    saved = [o["value"] for r in runs for o in r["outputs"] if o["node"] == "5"]
    assert len(saved) == 2 and all(Path(p).is_file() and Path(p).parent == base / "models" / "loras" for p in saved)
    assert any(o["node"] == "6" and o["kind"] == "image" for o in runs[0]["outputs"])


def test_cancel_over_the_api_leaves_a_checkpoint(server, tmp_path):
    """Start a long run, press Cancel (POST /interrupt) after the first live-view event: the run stops
    within a step and output/cat_checkpoints/<name>/ holds a loadable checkpoint."""
    import asyncio

    import aiohttp
    import torch

    url, _, base = server
    g = train_graph(steps=5000, seed=7, checkpoint_name="cancelled", save_name="never")

    async def go():
        steps, kinds = [], []
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId=cx") as ws:
            r = await s.post(url + "/prompt", json={"prompt": g, "client_id": "cx"})
            pid = (await r.json())["prompt_id"]
            while True:
                m = await ws.receive(timeout=120)
                if m.type != aiohttp.WSMsgType.TEXT:
                    continue
                d = json.loads(m.data)
                kinds.append(d["type"])
                if d["type"] == "cat.train.progress":
                    steps.append(d["data"]["step"])
                    if len(steps) == 1:
                        await s.post(url + "/interrupt", json={})
                if d["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                    return pid, steps, kinds

    pid, steps, kinds = asyncio.run(go())
    assert kinds[-1] == "execution_interrupted"
    assert 1 <= len(steps) <= 2 and steps[-1] < 5000  # stopped within one step of Cancel
    ckpts = sorted((base / "output" / "cat_checkpoints" / "cancelled").glob("cat-step*.pt"))
    assert ckpts, "no checkpoint after Cancel"
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["step"] == steps[-1] and state["lora"]
    assert not list((base / "models" / "loras").glob("never*"))  # downstream Save never ran


def test_queue_reports_a_prompt_that_fails_at_once_within_5s(server, tmp_path, capsys):
    """A run that fails in its first node (here: a resume file that does not exist) used to be missed by
    `queue`, which then waited for --timeout (24 h): the websocket now opens before the post."""
    from cat_train.queue import cli

    url, _, _ = server
    g = train_graph(steps=3, seed=0, checkpoint_name="fails", save_name="never_saved")
    g["4"]["inputs"]["resume_from"] = "no_such_dir/cat-step000001.pt"
    wf = tmp_path / "fail.api.json"
    wf.write_text(json.dumps(g))
    t0 = time.monotonic()
    rc = cli.main([str(wf), "--server", url])
    elapsed = time.monotonic() - t0
    text = capsys.readouterr().out
    assert rc == 1 and elapsed < 5.0, (rc, elapsed, text)
    assert "FAILED: node 4 (CAT_LoraTrainer): resume checkpoint" in text and "does not exist" in text
    print(f"failure reported after {elapsed:.2f}s")
