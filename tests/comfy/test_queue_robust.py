"""Issue 32's batch-run cases that are about a server, through a real ComfyUI (main.py --cpu, this pack, tiny models):
a dry run checks the graph's own files against the server, "false" as text for a boolean (what ComfyUI makes of it,
measured, and what the queue sends instead), the LoRA-family warning printed by the queue CLI, and a storage error
printed as the pack's message."""
from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

from test_queue_guards import _files, _graph, _history, _queue
from test_server import server, train_graph  # noqa: F401  (the module-scoped real server)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from cat_train.queue import cli

    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _workflow(tmp_path, graph: dict, name: str = "g.api.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(graph))
    return str(p)


def test_a_dry_run_refuses_a_checkpoint_the_server_does_not_have(server, tmp_path, capsys):  # noqa: F811
    """The probe: `queue --dry-run` passed a graph whose checkpoint the server does not have; the real run was then
    refused by ComfyUI, run after run."""
    url, _, base = server
    _files(base)
    rc, out, err = _cli([_workflow(tmp_path, _graph("sd15_missing.safetensors", [])), "--server", url, "--dry-run"], capsys)
    assert rc == 2, (out, err)
    assert "node 1 (CheckpointLoaderSimple) ckpt_name 'sd15_missing.safetensors' is not on the server (it lists " in err
    assert "'fake_v15.safetensors'" in err and "put the file in ComfyUI's models/checkpoints folder" in err
    assert "run 1/1" not in out
    rc, out, err = _cli([_workflow(tmp_path, _graph("fake_v15.safetensors", [])), "--server", url, "--dry-run"], capsys)
    assert rc == 0 and "run 1/1" in out, (out, err)


def _stored_buckets(url: str, pid: str) -> object:
    """The CAT Dataset's `buckets` as the server ran it: the prompt /history keeps is the one it validated."""
    entry = _history(url, pid, wait=120)
    return entry["prompt"][2]["2"]["inputs"]["buckets"]


def test_false_as_text_for_a_boolean(server, tmp_path, capsys):  # noqa: F811
    """Measured: ComfyUI's validation turns a BOOLEAN's text into bool(text), so "false" runs as true, before any node
    of this pack sees it (0.3.64 and 0.33 alike); the pack's on-prompt hook says so to the client that queued it. The
    queue CLI sends the boolean the text names, and says so."""
    url, _, _ = server
    g = train_graph(steps=1, seed=3, checkpoint_name="q_bool", save_name="q_bool")
    g["2"]["inputs"]["buckets"] = "false"
    pid = str(uuid.uuid4())
    status, resp, events = asyncio.run(_queue(url, {"prompt": g, "prompt_id": pid}, "qb1"))
    assert status == 200 and resp["node_errors"] == {}, resp
    assert _stored_buckets(url, pid) is True  # what ComfyUI ran: the text "false" as true
    assert [e["title"] for e in events] == ["Text in a true/false input"], events
    assert events[0]["prompt_id"] == pid
    assert events[0]["warnings"] == ["node 2 (CAT_Dataset): buckets is the text 'false', which ComfyUI reads as true "
                                     "(any non-empty text is); send false without quotes."]
    out_json = tmp_path / "runs.json"
    rc, out, err = _cli([_workflow(tmp_path, g), "--server", url, "--out", str(out_json), "--timeout", "120"], capsys)
    assert rc == 0, (out, err)
    assert "note: node 2 (CAT_Dataset) buckets: the text 'false' is sent as false" in out
    assert "Text in a true/false input" not in out  # the server had nothing to warn of: it got a boolean
    [rec] = json.loads(out_json.read_text())
    assert _stored_buckets(url, rec["prompt_id"]) is False


def test_the_queue_prints_the_lora_family_warning(server, tmp_path, capsys):  # noqa: F811
    """The probe: the warning was in the server's log and the browser's toast only; the CLI dropped the event."""
    url, _, base = server
    _files(base)
    out_json = tmp_path / "runs.json"
    wf = _workflow(tmp_path, _graph("fake_xl.safetensors", ["cat_sd15.safetensors", "xl_lora.safetensors"]))
    rc, out, err = _cli([wf, "--server", url, "--out", str(out_json), "--timeout", "120"], capsys)
    assert rc == 1, (out, err)  # the header-only checkpoint fails to load in node 1, as queued
    assert f"warning from {url} (LoRA for another model family):" in out, out
    assert "    node 10 (LoraLoader): LoRA cat_sd15.safetensors was trained for SD1.x/SD2" in out
    assert "xl_lora" not in out.split("warning from", 1)[1].split("FAILED", 1)[0]
    [rec] = json.loads(out_json.read_text())
    assert len(rec["warnings"]) == 1 and "(fake_xl.safetensors) is SDXL" in rec["warnings"][0]


def test_a_storage_error_is_printed_as_its_message(server, tmp_path, capsys):  # noqa: F811
    """A checkpoint folder that cannot be made: ComfyUI recorded the pack's StorageError with a module path as its
    type and "[Errno 17] ..." as its text; the CLI prints the pack's message first, and now ComfyUI records it so."""
    url, _, base = server
    blocked = base / "output" / "cat_checkpoints" / "q_blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the run's folder would go")
    g = train_graph(steps=4, seed=4, checkpoint_name="q_blocked", save_name="q_blocked")
    g["4"]["inputs"]["save_every"] = 2
    rc, out, err = _cli([_workflow(tmp_path, g), "--server", url, "--timeout", "120"], capsys)
    assert rc == 1, (out, err)
    line = next(x for x in out.splitlines() if "FAILED: node 4" in x)
    assert line.startswith(f"  FAILED: node 4 (CAT_LoraTrainer): checkpoint folder {blocked} cannot be written"), line
    assert "Errno" not in out and "StorageError" not in out
    hist = json.loads(urllib.request.urlopen(f"{url}/history", timeout=10).read())
    types = [m[1]["exception_type"] for e in hist.values() for m in e["status"]["messages"] if m[0] == "execution_error"
             and "q_blocked" in m[1]["exception_message"]]
    # what ComfyUI itself records, which its browser dialog shows: the pack's name, not its path (issue 32)
    assert types and types[-1] == "ComfyUI-CAT.StorageError", types


def test_which_boolean_texts_the_hook_warns_of(comfy):
    from conftest import pack_module

    hook = pack_module(comfy, "nodes.lora_family_warning")
    asked = []

    def input_types(cls):
        asked.append(cls)
        return {"required": {"flag": ("BOOLEAN", {}), "text": ("STRING", {})}, "optional": {"other": ("BOOLEAN", {})}}
    prompt = {"1": {"class_type": "A", "inputs": {"flag": "false", "other": " No ", "text": "false"}},
              "2": {"class_type": "B", "inputs": {"flag": "true", "other": "", "text": "a photo of sks dog"}},
              "3": {"class_type": "C", "inputs": {"flag": False, "other": ["1", 0]}}, "4": "odd", "5": {"inputs": None}}
    warned = hook.boolean_text_warnings(prompt, input_types)
    assert warned == ["node 1 (A): flag is the text 'false', which ComfyUI reads as true (any non-empty text is); "
                      "send false without quotes.",
                      "node 1 (A): other is the text ' No ', which ComfyUI reads as true (any non-empty text is); "
                      "send false without quotes."]
    assert asked == ["A"]  # the node classes are asked for their inputs only where a text says false
    assert hook.boolean_text_warnings([1], input_types) == [] and hook.boolean_text_warnings(None, input_types) == []
