"""What ComfyUI's /history entry of a finished prompt says: where its outputs landed, whether it failed and why,
and the scores its KPS Evaluator and Leak Scan nodes reported."""
from __future__ import annotations

import re


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


def status_of(entry: dict) -> tuple[bool, str]:
    """(ok, why not): the error's node and message, or the interrupt. An entry without a status counts as ok."""
    st = entry.get("status") or {}
    ok = st.get("status_str", "success") == "success"
    msg = ""
    for name, data in st.get("messages", []):
        if name == "execution_error":
            # an OSError's text starts with "[Errno 28] ": the message (this pack's names the file and the fix) comes
            # first; ComfyUI's exception_type, a module path for a pack's error, is not shown
            text = _ERRNO.sub("", str(data.get("exception_message", "")).strip())
            msg = f"node {data.get('node_id')} ({data.get('node_type')}): " \
                  + (text or str(data.get("exception_type", "error")).rsplit(".", 1)[-1])
        elif name == "execution_interrupted":
            msg = "interrupted (Cancel)"
    return ok, msg


_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")
_SCORE = re.compile(r"^(KPS|PS|IS)\s+(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan)\b", re.M)
_LEAK_ROW = re.compile(r"^\s*1\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+(.+)$", re.M)


def scores_of(entry: dict, graph: dict) -> dict:
    """{node id: {"PS", "IS", "KPS"}} of each KPS Evaluator and {node id: {"max_drift", "worst_probe"}} of each
    Leak Scan, read from the report text the nodes put in /history (their `ui` output)."""
    found = {}
    for nid, out in (entry.get("outputs") or {}).items():
        cls = graph.get(nid, {}).get("class_type")
        report = "\n".join(t for t in out.get("text", []) if isinstance(t, str))
        if cls == "CAT_KPSEvaluator":
            vals = {}
            for k, v in _SCORE.findall(report):
                vals.setdefault(k, float(v))
            if vals:
                found[nid] = vals
        elif cls == "CAT_LeakScan":
            m = _LEAK_ROW.search(report)
            if m:
                found[nid] = {"max_drift": float(m.group(1)), "worst_probe": m.group(4).strip()}
    return found
