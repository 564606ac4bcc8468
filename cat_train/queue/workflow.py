"""One API-format workflow: read from its file, its nodes named by id or by a type that occurs once, and
values set on it typed and checked against a server's /object_info the way ComfyUI's validation will."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from .errors import QueueError

WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def resolve_node(graph: dict, node: str) -> str:
    if node in graph:
        return node
    hits = [k for k, v in graph.items() if v.get("class_type") == node]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise QueueError(f"node type {node!r} occurs {len(hits)} times (ids {', '.join(hits)}); name the node by id.")
    listing = ", ".join(f"{k} ({v.get('class_type')})" for k, v in sorted(graph.items(), key=lambda kv: kv[0]))
    raise QueueError(f"the workflow has no node {node!r}; its nodes are: {listing}.")


def input_spec(object_info: dict, class_type: str, name: str):
    """The /object_info spec of one input ([type, options]) or None when the server does not list it."""
    spec = (object_info.get(class_type) or {}).get("input", {})
    for part in ("required", "optional"):
        if name in spec.get(part, {}):
            return spec[part][name]
    return None


def known_inputs(object_info: dict, class_type: str) -> set[str] | None:
    info = object_info.get(class_type)
    if info is None:
        return None
    spec = info.get("input", {})
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def typed_value(text: str, spec, where: str):
    """The value ComfyUI's validation accepts for `text`, or QueueError naming the input, the value and the fix."""
    kind = spec[0] if spec else None
    opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if choices is not None:
        for cand in (text, parse_value(text)):
            if cand in choices:
                return cand
        shown = ", ".join(map(repr, choices[:12])) + (f", ... ({len(choices)} in all)" if len(choices) > 12 else "")
        raise QueueError(f"{where}={text!r}: not one of the server's choices: {shown}.")
    if kind == "STRING":
        return text
    if kind == "BOOLEAN":
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise QueueError(f"{where}={text!r}: a BOOLEAN input takes true or false.")
    if kind in ("INT", "FLOAT"):
        v = parse_value(text)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (kind == "INT" and not float(v).is_integer()):
            raise QueueError(f"{where}={text!r}: not a{'n integer' if kind == 'INT' else ' number'} "
                             f"(the input is {kind}).")
        v = int(v) if kind == "INT" else float(v)
        lo, hi = opts.get("min"), opts.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise QueueError(f"{where}={text!r}: outside the input's range [{lo}, {hi}].")
        return v
    if isinstance(kind, str) and kind not in WIDGET_TYPES:
        raise QueueError(f"{where} takes a {kind} from another node (a link in the graph), not a value; "
                         "set an input of the node that makes it instead.")
    return parse_value(text)  # a type this client does not know: JSON when it parses, as typed otherwise


def apply_overrides(graph: dict, overrides: list[tuple[str, str, str]], object_info: dict) -> dict:
    g = copy.deepcopy(graph)
    for node, name, text in overrides:
        nid = resolve_node(g, node)
        cls = g[nid]["class_type"]
        names = known_inputs(object_info, cls)
        if names is None:
            names = set(g[nid]["inputs"])
        if name not in names:
            raise QueueError(f"node {nid} ({cls}) has no input {name!r}; its inputs are: {', '.join(sorted(names))}.")
        spec = input_spec(object_info, cls, name)
        if spec is None and _is_link(g[nid]["inputs"].get(name)):
            raise QueueError(f"{node}.{name} is a link from node {g[nid]['inputs'][name][0]} in the graph, not a value.")
        g[nid]["inputs"][name] = typed_value(text, spec, f"{node}.{name}")
    return g


def check_node_types(graph: dict, object_info: dict) -> None:
    missing = sorted({v["class_type"] for v in graph.values()} - set(object_info))
    if missing:
        hint = " Install ComfyUI-CAT into custom_nodes/ and restart the server." if any(m.startswith("CAT_") for m in missing) else ""
        raise QueueError(f"the server has no node type(s) {', '.join(missing)}.{hint}")


def load_workflow(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QueueError(f"workflow file {path} does not exist.") from None
    except ValueError as e:
        raise QueueError(f"workflow file {path} is not JSON: {e}.") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise QueueError(f"{path} is a UI-format workflow; queue needs the API format "
                         "(the workflows/api/*.api.json files, or the editor's 'Export (API)').")
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise QueueError(f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}}).")
    return data
