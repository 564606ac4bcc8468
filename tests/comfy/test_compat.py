"""nodes/compat.py asks the host ComfyUI which features it has; these tests hold each answer against what the host
actually does, and check that the nodes use the answers: on a ComfyUI with search aliases and advanced inputs
(v0.33) the node info the editor reads carries them, on one without (v0.3.64) the same code builds every schema."""
from __future__ import annotations

import json

from conftest import ROOT, pack_module

# the inputs folded under "advanced inputs" where the host has them: fine-tuning knobs, all optional, all left at
# their defaults by the shipped workflows
ADVANCED = {
    "CAT_AptOptions": {"ema", "target", "min_weight", "max_augment", "align_distance", "stabilize_layers", "align_layers",
                       "form", "zoom_out", "fill", "stabilize_stat", "stabilize_normalize", "align_skip_triggers"},
    "CAT_AutoPreservation": {"points", "images", "seed", "neighbours", "rule", "first"},
    "CAT_LossConfig": {"keep_every", "keep_fraction", "keep_estimator"},
}


def _takes(build) -> bool:
    try:
        build()
    except TypeError:
        return False
    return True


def test_feature_checks_answer_what_the_host_takes(comfy):
    from comfy_api.latest import io

    C = pack_module(comfy, "nodes.compat")
    assert C.schema_takes_search_aliases() is _takes(lambda: io.Schema(node_id="CATTest_Probe", search_aliases=["x"]))
    for t, extra in ((io.Int, {}), (io.Float, {}), (io.Boolean, {}), (io.String, {}), (io.Combo, {"options": ["a"]})):
        assert C.input_takes_advanced(t) is _takes(lambda: t.Input("x", advanced=True, **extra)), t
    assert C.search_aliases("a", "b") == ({"search_aliases": ["a", "b"]} if C.schema_takes_search_aliases() else {})
    assert C.advanced(io.Int) == ({"advanced": True} if C.input_takes_advanced(io.Int) else {})


def _infos(comfy) -> dict[str, dict]:
    return {k: cls.GET_NODE_INFO_V1() for k, cls in comfy.nodes.NODE_CLASS_MAPPINGS.items()
            if k.startswith("CAT_") and hasattr(cls, "GET_NODE_INFO_V1")}


def test_node_info_carries_aliases_and_advanced_inputs_where_the_host_has_them(comfy):
    from comfy_api.latest import io

    C = pack_module(comfy, "nodes.compat")
    infos = _infos(comfy)
    assert len(infos) == 12
    for node, info in infos.items():
        aliases = info.get("search_aliases")
        if C.schema_takes_search_aliases():
            assert aliases and all(isinstance(a, str) and a.strip() for a in aliases), node
        else:
            assert not aliases, node
        marked = {name for group in ("required", "optional") for name, spec in info["input"].get(group, {}).items()
                  if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("advanced")}
        assert marked == (ADVANCED.get(node, set()) if C.input_takes_advanced(io.Int) else set()), node
        # a folded widget is never one a graph must set
        assert not marked & set(info["input"].get("required", {})), node


def test_shipped_workflows_leave_every_advanced_input_at_its_default(comfy):
    """A template opened on the new frontend shows its advanced widgets folded: none may hide a changed value."""
    infos = _infos(comfy)
    checked = 0
    for path in sorted((ROOT / "workflows" / "api").glob("*.api.json")):
        for node_id, node in json.loads(path.read_text()).items():
            for name in ADVANCED.get(node["class_type"], ()):
                if name in node["inputs"]:
                    default = infos[node["class_type"]]["input"]["optional"][name][1]["default"]
                    assert node["inputs"][name] == default, f"{path.name} node {node_id}: {name}"
                    checked += 1
    assert checked >= 21  # keep_every, keep_fraction and keep_estimator on each of the 7 Loss Configs of the workflows
