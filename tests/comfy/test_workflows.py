"""Every shipped workflow against the schemas ComfyUI registered, and one run end to end in the executor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_prompt

WF = ROOT / "workflows"
API = sorted(WF.glob("*.api.json"))
UI = sorted(p for p in WF.glob("*.json") if not p.name.endswith(".api.json"))


def _specs(cls):
    info = cls.INPUT_TYPES()
    return {name: spec for sec in ("required", "optional") for name, spec in info.get(sec, {}).items()}, info.get("required", {})


def test_workflow_set_is_complete():
    names = {p.name.split(".")[0] for p in API}
    assert {"cat_sd15_train_kps", "cat_sdxl_train_kps", "cat_vs_lora_sd15"} <= names
    assert names == {p.name.split(".")[0] for p in UI}  # each in both formats


@pytest.mark.parametrize("path", API, ids=lambda p: p.name)
def test_api_workflow_matches_schemas(comfy, path):
    maps = comfy.nodes.NODE_CLASS_MAPPINGS
    g = json.loads(path.read_text())
    for nid, node in g.items():
        cls = maps.get(node["class_type"])
        assert cls is not None, f"{path.name} node {nid}: unknown node type {node['class_type']}"
        specs, required = _specs(cls)
        assert set(node["inputs"]) <= set(specs), f"{path.name} node {nid}: unknown inputs {set(node['inputs']) - set(specs)}"
        assert set(required) <= set(node["inputs"]), f"{path.name} node {nid}: missing {set(required) - set(node['inputs'])}"
        for name, v in node["inputs"].items():
            typ = specs[name][0]
            if isinstance(v, list):  # a link: the source output's type must be what this input takes
                src = maps[g[v[0]]["class_type"]]
                assert src.RETURN_TYPES[v[1]] == typ, f"{path.name} {nid}.{name}: {src.RETURN_TYPES[v[1]]} into {typ}"
            elif isinstance(typ, list) and node["class_type"] not in ("CheckpointLoaderSimple", "CAT_KPSEvaluator"):
                assert v in typ, f"{path.name} {nid}.{name}={v!r} not among {typ}"  # model files are the user's
            elif typ in ("INT", "FLOAT"):
                o = specs[name][1]
                assert o.get("min", -1e30) <= v <= o.get("max", 1e30), f"{path.name} {nid}.{name}={v} out of range"
    assert any(n["class_type"] == "CAT_LoraTrainer" for n in g.values())


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_ui_workflow_matches_schemas(comfy, path):
    maps = comfy.nodes.NODE_CLASS_MAPPINGS
    ui = json.loads(path.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        cls = maps.get(n["type"])
        assert cls is not None, f"{path.name}: unknown node type {n['type']}"
        specs, _ = _specs(cls)
        widgets = [k for k, s in specs.items() if (isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
                   and not any(i["name"] == k for i in n["inputs"])]
        extra = sum(1 for k in widgets if len(specs[k]) > 1 and specs[k][1].get("control_after_generate"))
        assert len(n["widgets_values"]) == len(widgets) + extra, f"{path.name} node {n['id']} {n['type']}: widget count"
        assert [o["type"] for o in n["outputs"]] == list(cls.RETURN_TYPES)
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        assert nodes[src]["outputs"][sslot]["type"] == typ and lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["type"] == typ and nodes[dst]["inputs"][dslot]["link"] == lid


@pytest.mark.parametrize("name, kind", [("cat_sd15_train_kps", "sd15"), ("cat_sdxl_train_kps", "sdxl")])
def test_workflow_runs_end_to_end(comfy, test_checkpoint_node, tiny_open_clip, dataset_dir, name, kind):
    """A shipped graph, with the checkpoint loader swapped for the tiny model and sizes cut for CPU."""
    g = json.loads((WF / f"{name}.api.json").read_text())
    g["1"] = {"class_type": "CATTest_TinyCheckpoint", "inputs": {"kind": kind}}
    for node in g.values():
        i, c = node["inputs"], node["class_type"]
        if c == "CAT_Dataset":
            i.update(folder=str(dataset_dir), resolution=128)
        elif c == "CAT_LoraTrainer":
            i.update(steps=3, save_every=0, dtype="fp32", rank=4, lora_alpha=4.0, learning_rate=1e-2)
        elif c == "EmptyLatentImage":
            i.update(width=64, height=64, batch_size=2)
        elif c == "KSampler":
            i.update(steps=2)
        elif c == "CAT_KPSEvaluator":
            i.update(clip_checkpoint=tiny_open_clip, open_clip_model="CATTinyCLIP")
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    kps_node = next(k for k, n in g.items() if n["class_type"] == "CAT_KPSEvaluator")
    report = out[kps_node]["text"][0]
    assert "KPS" in report and "2 pairs" in report
    save_node = next(k for k, n in g.items() if n["class_type"] == "CAT_SaveLora")
    saved = Path(out[save_node]["text"][0])
    assert saved.is_file() and saved.parent == Path(comfy.folder_paths.get_folder_paths("loras")[0])
    imgs = [k for k, n in g.items() if n["class_type"] == "SaveImage"]
    assert all(len(out[k]["images"]) == 2 for k in imgs)


def test_kps_evaluator_numbers(comfy, tiny_open_clip):
    """KPS = 1 - H(cos(with, without)): exactly 0 for identical batches, > 0 when they differ; IS = 1 vs itself."""
    import torch

    kps = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_KPSEvaluator"]
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 48, 48, 3, generator=g), torch.rand(3, 48, 48, 3, generator=g)
    out = kps.execute(a, a, "a photo of sks dog", tiny_open_clip, "CATTinyCLIP", reference_images=a).result
    ps, is_, k = out[0], out[1], out[2]
    assert abs(k) < 1e-6 and abs(is_ - 1) < 1e-6 and -1 <= ps <= 1
    assert out[4].shape[0] == 1 and out[4].shape[-1] == 3  # chart IMAGE
    k2 = kps.execute(a, b.flip(1) * 0.2, "", tiny_open_clip, "CATTinyCLIP").result[2]
    assert k2 > 1e-4
    with pytest.raises(ValueError, match="equal batches"):
        kps.execute(a, a[:2], "", tiny_open_clip, "CATTinyCLIP")
