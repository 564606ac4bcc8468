"""Issue 22's two queue-time cases through a real ComfyUI server (main.py --cpu, this pack in custom_nodes):
a LoRA of another family applied by the stock loaders is warned about (log and a `cat.warning` event for the
client's toast) without blocking or changing the graph, and a Cancel sent right after Queue stops the run."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from test_server import server  # noqa: F401  (the module-scoped real server)

T = torch.zeros(1)


def _files(base: Path) -> None:
    """Header-only stand-ins: an SDXL and an SD1.5 checkpoint, an SD1.5 CAT LoRA and an SDXL LoRA."""
    ck, lo = base / "models" / "checkpoints", base / "models" / "loras"
    ck.mkdir(parents=True, exist_ok=True)
    lo.mkdir(parents=True, exist_ok=True)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": T.clone(),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2816)}, str(ck / "fake_xl.safetensors"))
    save_file({"model.diffusion_model.input_blocks.0.0.weight": T.clone()}, str(ck / "fake_v15.safetensors"))
    save_file({"lora_unet_x.alpha": T.clone()}, str(lo / "cat_sd15.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    save_file({"lora_unet_x.alpha": T.clone()}, str(lo / "xl_lora.safetensors"),
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def _graph(ckpt: str, loras: list[str]) -> dict:
    """Checkpoint -> LoraLoader / LoraLoaderModelOnly chain -> ModelSave (an output node that takes a MODEL)."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model = ["1", 0]
    for i, name in enumerate(loras):
        nid = str(10 + i)
        if i % 2:
            g[nid] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name, "strength_model": 1.0}}
        else:
            g[nid] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": ["1", 1], "lora_name": name,
                                                             "strength_model": 1.0, "strength_clip": 1.0}}
        model = [nid, 0]
    g["9"] = {"class_type": "ModelSave", "inputs": {"model": model, "filename_prefix": "never/x"}}
    return g


async def _queue(url: str, body: dict, client: str, settle: float = 1.0):
    """POST /prompt with a websocket open as `client`; (status, response, cat.warning events) once the prompt ended
    (or, refused, after `settle` s)."""
    import aiohttp

    events = []
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client}") as ws:
        r = await s.post(url + "/prompt", json={**body, "client_id": client})
        status = r.status
        resp = await r.json() if r.content_type == "application/json" else await r.text()
        deadline = time.monotonic() + (60 if status == 200 else settle)
        while time.monotonic() < deadline:
            try:
                m = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if m.type != aiohttp.WSMsgType.TEXT:
                continue
            d = json.loads(m.data)
            if d["type"] == "cat.warning":
                events.append(d["data"])
            if d["type"] in ("execution_error", "execution_success", "execution_interrupted"):
                break
    return status, resp, events


def _history(url: str, pid: str, wait: float = 30) -> dict:
    """The prompt's /history entry (written just after its last websocket event)."""
    import urllib.request

    deadline = time.monotonic() + wait
    while True:
        h = json.loads(urllib.request.urlopen(f"{url}/history/{pid}", timeout=10).read())
        if pid in h or time.monotonic() > deadline:
            return h[pid]
        time.sleep(0.1)


def test_an_sd15_lora_on_an_sdxl_checkpoint_is_warned_and_still_queued(server):  # noqa: F811
    url, _, base = server
    _files(base)
    status, resp, events = asyncio.run(_queue(url, {"prompt": _graph("fake_xl.safetensors", ["cat_sd15.safetensors",
                                                                                          "xl_lora.safetensors",
                                                                                          "cat_sd15.safetensors"])}, "w1"))
    assert status == 200 and resp["node_errors"] == {}, resp  # queued as without the pack
    assert len(events) == 1 and len(events[0]["warnings"]) == 2, events  # the two SD1.5 loaders, not the SDXL one
    text = "\n".join(events[0]["warnings"])
    assert "node 10 (LoraLoader): LoRA cat_sd15.safetensors was trained for SD1.x/SD2" in text
    assert "node 12 (LoraLoader)" in text and "(fake_xl.safetensors) is SDXL" in text and "xl_lora" not in text
    # it ran as queued: the fake checkpoint (a header only) fails to load in node 1, not before
    hist = _history(url, resp["prompt_id"])
    errors = [m for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0][1]["node_id"] == "1", hist
    log = (base / "server.log").read_text()
    assert "ComfyUI-CAT: node 11" not in log and "ComfyUI-CAT: node 10 (LoraLoader): LoRA cat_sd15" in log


def test_matching_families_and_odd_graphs_say_nothing(server):  # noqa: F811
    url, _, base = server
    _files(base)
    status, resp, events = asyncio.run(_queue(url, {"prompt": _graph("fake_v15.safetensors", ["cat_sd15.safetensors"])}, "w2"))
    assert status == 200 and events == [], events
    odd = [{"prompt": {"1": {"class_type": "LoraLoader", "inputs": "x"}, "2": 5, "3": {"class_type": "LoraLoaderModelOnly",
                                                                                       "inputs": {"model": ["3", 0], "lora_name": 7}}}},
           {"prompt": [1, 2]}, {"prompt": {"1": {"class_type": "LoraLoaderModelOnly",
                                                 "inputs": {"model": ["1", 0], "lora_name": "cat_sd15.safetensors"}}}}]
    before = (base / "server.log").read_text().count("on_prompt_handler")
    for body in odd:
        status, resp, events = asyncio.run(_queue(url, body, "w3", settle=0.5))
        assert status in (400, 500) and events == [], (body, status, resp)  # ComfyUI's own refusal (its 500 for "2": 5)
    assert (base / "server.log").read_text().count("on_prompt_handler") == before  # no handler error logged


def test_a_cancel_sent_while_the_run_is_queued_stops_it_when_it_starts(server):  # noqa: F811
    """Run A keeps the worker busy; B (5000 steps) is queued behind it and cancelled at once by its prompt id, which
    ComfyUI skips ("not currently running"). A must finish untouched; B must stop as it starts, before any step."""
    import aiohttp

    from test_server import train_graph

    url, _, base = server
    a = train_graph(steps=20, seed=11, checkpoint_name="busy_a", save_name="busy_a")
    b = train_graph(steps=5000, seed=12, checkpoint_name="early_b", save_name="never_b")

    async def go():
        current, seen = None, {}
        async with aiohttp.ClientSession() as s, s.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId=ec") as ws:
            ids = []
            for g in (a, b):
                r = await s.post(url + "/prompt", json={"prompt": g, "client_id": "ec"})
                ids.append((await r.json())["prompt_id"])
            await s.post(url + "/interrupt", json={"prompt_id": ids[1]})
            t_cancel = time.monotonic()
            while True:
                m = await ws.receive(timeout=300)
                if m.type != aiohttp.WSMsgType.TEXT:
                    continue
                d = json.loads(m.data)
                kind, data = d["type"], d.get("data") or {}
                if kind == "execution_start":
                    current = data["prompt_id"]
                    seen[current] = {"start": time.monotonic(), "steps": 0}
                elif kind == "cat.train.progress" and current:
                    seen[current]["steps"] += 1
                elif kind in ("execution_success", "execution_interrupted", "execution_error") and current:
                    seen[current].update(end=time.monotonic(), how=kind)
                    if current == ids[1]:
                        return ids, seen, t_cancel

    ids, seen, t_cancel = asyncio.run(go())
    ra, rb = seen[ids[0]], seen[ids[1]]
    assert ra["how"] == "execution_success" and ra["steps"] == 20, ra  # the Cancel was not A's
    assert rb["start"] > t_cancel  # B was still queued when its Cancel came
    assert rb["how"] == "execution_interrupted" and rb["steps"] == 0, rb
    stop = rb["end"] - rb["start"]
    print(f"B stopped {stop:.2f} s after it started ({rb['end'] - t_cancel:.2f} s after Cancel, A ran in between)")
    assert stop < 10
    assert not list((base / "models" / "loras").glob("never_b*"))
    assert not (base / "output" / "cat_checkpoints" / "early_b").exists()  # stopped before the trainer's first work


def test_what_each_interrupt_is_aimed_at(comfy):
    from conftest import pack_module

    ec = pack_module(comfy, "nodes.early_cancel")
    running, pending = [(3, "r")], [(9, "later"), (-1, "front"), (5, "next")]
    assert ec.targets({"prompt_id": "b"}, running, pending) == ["b"]  # named: that one, running or not
    assert ec.targets({}, running, pending) == ["r"]  # global: the running one, as ComfyUI means it
    assert ec.targets(None, [], pending) == ["front"]  # nothing running: the next to run (queued at the front)
    assert ec.targets({}, [], []) == []
    ec.record(["x"])
    assert ec.requested("x") and not ec.requested("x")  # taken once
    assert not ec.requested(None) and not ec.requested("never")
    ec.record([f"p{i}" for i in range(ec.KEEP + 5)])
    assert not ec.requested("p0") and ec.requested(f"p{ec.KEEP + 4}")  # old records age out


def test_the_prompt_hook_returns_every_body_as_received(comfy):
    from conftest import pack_module

    hook = pack_module(comfy, "nodes.lora_family_warning")
    bodies = [{"prompt": {"1": {"class_type": "LoraLoader", "inputs": None}}}, {"prompt": "x"}, {}, [], None, "text",
              {"prompt": {"1": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "a"}}}}]
    for body in bodies:
        snapshot = json.dumps(body)
        assert hook.on_prompt(body) is body and json.dumps(body) == snapshot
