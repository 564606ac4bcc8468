"""Every shipped workflow against the schemas ComfyUI registered, and one run end to end in the executor."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, pack_module, run_prompt, shrink_for_cpu

WF = ROOT / "workflows"
API = sorted((WF / "api").glob("*.api.json"))
UI = sorted(WF.glob("*.json"))


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
                assert typ == "*" or src.RETURN_TYPES[v[1]] == typ, f"{path.name} {nid}.{name}: {src.RETURN_TYPES[v[1]]} into {typ}"
            elif isinstance(typ, list) and node["class_type"] not in ("CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader",
                                                                               "CAT_KPSEvaluator"):
                assert v in typ, f"{path.name} {nid}.{name}={v!r} not among {typ}"  # model files are the user's
            elif typ in ("INT", "FLOAT"):
                o = specs[name][1]
                assert o.get("min", -1e30) <= v <= o.get("max", 1e30), f"{path.name} {nid}.{name}={v} out of range"
    assert any(n["class_type"] in ("CAT_LoraTrainer", "CAT_CatVersionTrainer") for n in g.values())


CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # editor-side nodes: never sent to the server


def editor_widget_slots(name: str, spec: tuple) -> list[str]:
    """What the graph editor (ComfyUI frontend 1.27, useIntWidget / addComboWidget) stores in widgets_values
    for one widget input: the value, then for an INT a "control after generate" value when the spec says
    control_after_generate or, by the editor's legacy rule, when the input is named seed or noise_seed and
    the spec does not say otherwise; for a COMBO the control and a filter text only when the spec asks."""
    typ = "COMBO" if isinstance(spec[0], list) else spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = opts.get("control_after_generate")
    if typ == "INT" and (flag if flag is not None else name in ("seed", "noise_seed")):
        return ["value", "control"]
    if typ == "COMBO" and flag:
        return ["value", "control", "filter"]
    return ["value"]


def test_editor_rule_counts_the_seed_control():
    """The rule above on specs the editor treats differently: seed by name, explicit flags both ways."""
    assert editor_widget_slots("seed", ("INT", {"min": 0})) == ["value", "control"]
    assert editor_widget_slots("noise_seed", ("INT", {})) == ["value", "control"]
    assert editor_widget_slots("seed", ("INT", {"control_after_generate": False})) == ["value"]
    assert editor_widget_slots("steps", ("INT", {"control_after_generate": True})) == ["value", "control"]
    assert editor_widget_slots("seed", ("FLOAT", {})) == ["value"]
    assert editor_widget_slots("mode", (["a", "b"], {"control_after_generate": True})) == ["value", "control", "filter"]


def _check_value(where: str, name: str, spec: tuple, v) -> None:
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(typ, list):
        assert isinstance(v, str), f"{where}: {name}={v!r} is not a choice"
    elif typ == "INT":
        assert isinstance(v, int) and not isinstance(v, bool), f"{where}: {name}={v!r} is not an INT"
        assert opts.get("min", -2**63) <= v <= opts.get("max", 2**64), f"{where}: {name}={v} out of range"
    elif typ == "FLOAT":
        assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{where}: {name}={v!r} is not a FLOAT"
    elif typ == "BOOLEAN":
        assert isinstance(v, bool), f"{where}: {name}={v!r} is not a BOOLEAN"
    elif typ == "STRING":
        assert isinstance(v, str), f"{where}: {name}={v!r} is not a STRING"


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_ui_workflow_matches_schemas(comfy, path):
    """Reads widgets_values slot by slot the way the editor does (control widgets included): every value
    has its widget's type and equals the shipped API graph's input, so nothing lands one slot off."""
    maps = comfy.nodes.NODE_CLASS_MAPPINGS
    ui = json.loads(path.read_text())
    api = json.loads((WF / "api" / path.name.replace(".json", ".api.json")).read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert {str(n["id"]) for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY} == set(api)
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        cls = maps.get(n["type"])
        assert cls is not None, f"{path.name}: unknown node type {n['type']}"
        specs, required = _specs(cls)
        where = f"{path.name} node {n['id']} {n['type']}"
        # a widget fed by a link keeps its slot (the editors of v0.3.64 and v0.33 map values by position:
        # test_browser.py's template test loads each graph there); its value is not the API graph's (a link)
        linked = {i["name"] for i in n["inputs"] if i.get("link") is not None}
        slots = [(k, "linked" if k in linked and kind == "value" else kind) for k, s in specs.items()
                 if (isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
                 and not (len(s) > 1 and s[1].get("forceInput"))
                 for kind in editor_widget_slots(k, s)]
        values = n["widgets_values"]
        # a graph saved before a node gained optional widgets (appended last) holds fewer values: the editor fills
        # the slots in order and leaves the trailing new ones at their defaults
        newer = [k for k, _ in slots[len(values):]]
        assert len(values) <= len(slots) and not any(k in required for k in newer), \
            f"{where}: {len(values)} widget values for {len(slots)} editor widgets {slots}"
        for (k, kind), v in zip(slots, values):
            if kind == "control":
                assert v in CONTROL_VALUES, f"{where}: control after {k} holds {v!r}"
            elif kind == "value":
                _check_value(where, k, specs[k], v)
                assert v == api[str(n["id"])]["inputs"][k], f"{where}: {k}={v!r}, the API graph has {api[str(n['id'])]['inputs'][k]!r}"
        shipped, rtypes = [o["type"] for o in n["outputs"]], list(cls.RETURN_TYPES)
        if n["type"].startswith("CAT_"):
            assert shipped == rtypes, f"{where}: outputs {shipped}, the node has {rtypes}"
        else:  # the graphs are built on the oldest supported ComfyUI: a core node that gained outputs since (SaveImage,
            # Preview Any on v0.33) gets them from the editor on load, after the shipped ones (test_browser.py)
            assert shipped == rtypes[:len(shipped)], f"{where}: outputs {shipped}, the node has {rtypes}"
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        assert nodes[src]["outputs"][sslot]["type"] == typ and lid in nodes[src]["outputs"][sslot]["links"]
        assert nodes[dst]["inputs"][dslot]["type"] in (typ, "*") and nodes[dst]["inputs"][dslot]["link"] == lid


NOTE_REF = re.compile(r"(?:[Ee]ach of the (\d+) )?([A-Z][A-Za-z0-9]*(?: [A-Z][A-Za-z0-9]*)*)(?: nodes)? > ([a-z_0-9]+)")


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_note_names_only_what_the_graph_has(comfy, path):
    """The Note is what a user reads first: every 'Node > widget' it names is a node of this graph (by its display
    name) with that widget, a count it gives is the graph's count, and every pack node it mentions is in the graph."""
    ui = json.loads(path.read_text())
    (note,) = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note"]
    display = {**{k: k for k in comfy.nodes.NODE_CLASS_MAPPINGS}, **comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS}
    by_name = {}
    for n in ui["nodes"]:
        if n["type"] not in FRONTEND_ONLY:
            by_name.setdefault(display.get(n["type"], n["type"]), []).append(n["type"])
    refs = NOTE_REF.findall(note)
    assert refs, f"{path.name}: the Note names no 'Node > widget' to edit"
    for count, name, widget in refs:
        assert name in by_name, f"{path.name}: the Note names {name!r}, which this graph does not have"
        assert not count or int(count) == len(by_name[name]), f"{path.name}: the Note says {count} {name}, the graph has {len(by_name[name])}"
        specs, _ = _specs(comfy.nodes.NODE_CLASS_MAPPINGS[by_name[name][0]])
        assert widget in specs, f"{path.name}: the Note names {name} > {widget}, which has no such widget"
    pack = {d for k, d in display.items() if k.startswith("CAT_")}
    for name in pack:
        if re.search(rf"\b{re.escape(name)}\b", note):
            assert name in by_name, f"{path.name}: the Note mentions {name!r}, which this graph does not have"
    if "cat_factor 0 is plain LoRA" in note:
        assert "CAT Loss Config" in by_name


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_workflow_opens_where_the_note_reads(path):
    """The saved view (extra.ds, restored by the editor) puts the Note on a 1920x1080 screen at a zoom where the
    frontend still draws text: below MinFontSizeForLOD / NODE_TEXT_SIZE = 8 / 14 it draws blank boxes."""
    ui = json.loads(path.read_text())
    ds = ui["extra"]["ds"]
    assert ds["scale"] >= 8 / 14 + 0.05
    (note,) = [n for n in ui["nodes"] if n["type"] == "Note"]
    (x, y), (w, h) = note["pos"], note["size"]
    sx, sy = (x + ds["offset"][0]) * ds["scale"], (y + ds["offset"][1]) * ds["scale"]
    assert 0 <= sx and sx + w * ds["scale"] <= 1920 - 100 and 0 <= sy and sy + h * ds["scale"] <= 1080 - 150


def _boxes(ui: dict) -> dict[int, tuple[float, float, float, float]]:
    """Node id -> (x0, y0, x1, y1) including the title bar above pos, as the editor draws it."""
    return {n["id"]: (n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in ui["nodes"]}


def overlaps(boxes: dict) -> list[tuple]:
    ids = sorted(boxes)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if boxes[a][0] < boxes[b][2] and boxes[b][0] < boxes[a][2] and boxes[a][1] < boxes[b][3] and boxes[b][1] < boxes[a][3]]


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_ui_workflow_layout_is_readable(path):
    """No node covers another; every node sits inside one group; the trainer has room for the live chart;
    the Note names the three things a user edits."""
    ui = json.loads(path.read_text())
    boxes = _boxes(ui)
    assert overlaps(boxes) == []
    titles = " ".join(g["title"] for g in ui["groups"]).lower()
    assert all(w in titles for w in ("data", "training", "sampling", "evaluation")), titles
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        x0, y0, x1, y1 = boxes[n["id"]]
        inside = [g["title"] for g in ui["groups"] if g["bounding"][0] <= x0 and g["bounding"][1] <= y0 - 10
                  and x1 <= g["bounding"][0] + g["bounding"][2] and y1 <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, f"{path.name} node {n['id']} {n['type']} is in groups {inside}"
    # the trainers are shipped at the size a run grows them to, so the growth covers no other node (the browser test
    # measures the growth): widgets, the live chart and, for the LoRA trainer, the preview grid
    for t in (n for n in ui["nodes"] if n["type"] == "CAT_LoraTrainer"):
        assert t["size"][1] >= 1120, "the LoRA trainer grows to 1120 px in Nodes 2.0 with the chart and a preview"
    for t in (n for n in ui["nodes"] if n["type"] == "CAT_CatVersionTrainer"):
        assert t["size"][1] >= 710, "the CatVersion trainer grows to ~710 px in Nodes 2.0 with the chart"
    note = next(n for n in ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
    model_file = "unet_name" if any(n["type"] == "UNETLoader" for n in ui["nodes"]) else "ckpt_name"
    for what in (model_file, "folder", "triggers", "class_word", "clip_checkpoint", "open_clip_model"):
        assert what in note, f"the Note does not mention {what}"


@pytest.mark.parametrize("name, kind", [("cat_sd15_train_kps", "sd15"), ("cat_sdxl_train_kps", "sdxl"),
                                        ("cat_flux_train_kps", "flux")])
def test_workflow_runs_end_to_end(comfy, test_checkpoint_node, tiny_open_clip, dataset_dir, name, kind):
    """A shipped graph, with the checkpoint loader(s) swapped for the tiny model and sizes cut for CPU."""
    g = shrink_for_cpu(json.loads((WF / "api" / f"{name}.api.json").read_text()), kind, dataset_dir, tiny_open_clip)
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    kps_node = next(k for k, n in g.items() if n["class_type"] == "CAT_KPSEvaluator")
    report = out[kps_node]["text"][0]
    assert "KPS" in report and "2 pairs" in report
    save_node = next(k for k, n in g.items() if n["class_type"] == "CAT_SaveLora")
    saved = Path(out[save_node]["text"][0])
    assert saved.is_file() and saved.parent == Path(comfy.folder_paths.get_folder_paths("loras")[0])
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:  # what LoRA managers show: the name it was saved as, the model it came from
        meta = f.metadata()
    assert meta["ss_output_name"] == g[save_node]["inputs"]["name"]
    assert meta["ss_sd_model_name"] == g["1"]["inputs"]["ckpt_name"] != ""
    imgs = [k for k, n in g.items() if n["class_type"] == "SaveImage"]
    assert all(len(out[k]["images"]) == (2 if "trigger" in g[k]["inputs"]["filename_prefix"] else 1) for k in imgs)
    assert all(out[k]["images"][0]["type"] == "output" for k in imgs)  # charts and grids in output/, not temp/
    # IS is computed as shipped: the dataset's images are the KPS Evaluator's references
    assert g[kps_node]["inputs"]["reference_images"] == ["2", 3] and "no reference images" not in report
    is_line = next(line for line in report.splitlines() if line.startswith("IS "))
    assert 0 <= float(is_line.split()[1]) <= 1
    # every text result is on a Preview Any: the KPS report, the trainer summary, the LoRA path
    shown = {g[k]["inputs"]["source"][0]: out[k]["text"][0] for k, n in g.items() if n["class_type"] == "PreviewAny"}
    trainer = next(k for k, n in g.items() if n["class_type"] == "CAT_LoraTrainer")
    assert shown[kps_node] == report and shown[save_node] == str(saved) and shown[trainer].startswith("CAT LoRA:")


def test_leak_scan_loop_runs_and_preserves_the_worst_probes(comfy, test_checkpoint_node, tiny_open_clip, dataset_dir):
    """train -> scan -> retrain with the scan's worst probes as preservation prompts -> scan again, in one graph."""
    from safetensors import safe_open

    g = shrink_for_cpu(json.loads((WF / "api" / "cat_leak_scan_loop_sd15.api.json").read_text()), "sd15", dataset_dir, tiny_open_clip,
                       steps=4, learning_rate=5e-2)
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    scans = sorted(k for k, n in g.items() if n["class_type"] == "CAT_LeakScan")
    first_report = out[scans[0]]["text"][0]
    save = next(k for k, n in g.items() if n["class_type"] == "CAT_SaveLora")
    with safe_open(out[save]["text"][0], "pt") as f:
        kept = json.loads(f.metadata()["cat_preservation_prompts"])
    probes = g[scans[0]]["inputs"]["probes"].splitlines()
    assert 1 <= len(kept) <= 2 and set(kept) <= set(probes)  # the retrain preserved what the first scan flagged
    assert all(p in first_report for p in kept)


def test_kps_evaluator_numbers(comfy, tiny_open_clip):
    """KPS = 1 - H(cos(with, without)): exactly 0 for identical batches, > 0 when they differ; IS = 1 vs itself."""
    import torch

    kps = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_KPSEvaluator"]
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 48, 48, 3, generator=g), torch.rand(3, 48, 48, 3, generator=g)
    out = kps.execute(a, a, "a photo of sks dog", tiny_open_clip, "CATTinyCLIP", reference_images=a).result
    ps, is_, k = out[0], out[1], out[2]
    assert abs(k) < 1e-6 and abs(is_ - 1) < 1e-6
    # PS by hand: clamped harmonic mean of cos(text, image) over the three images, from the same CLIP
    scorer = pack_module(comfy, "nodes.evaluate").scorer(tiny_open_clip, "CATTinyCLIP")
    cos = torch.nn.functional.cosine_similarity(scorer.embed_texts(["a photo of sks dog"] * 3).double(),
                                                scorer.embed_images(list(a)).double()).clamp_min(1e-6)
    assert cos.min() > 1e-6 and ps == pytest.approx(float(3 / (1 / cos).sum()), rel=1e-5, abs=1e-9)
    assert out[4].shape[0] == 1 and out[4].shape[-1] == 3  # chart IMAGE
    k2 = kps.execute(a, b.flip(1) * 0.2, "", tiny_open_clip, "CATTinyCLIP").result[2]
    assert k2 > 1e-4
    with pytest.raises(ValueError, match="equal batches"):
        kps.execute(a, a[:2], "", tiny_open_clip, "CATTinyCLIP")
