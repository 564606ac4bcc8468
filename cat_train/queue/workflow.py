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


def choices_of(spec) -> list | None:
    """A combo input's choices (a list as the type before 0.3.6x, COMBO with options after), else None."""
    kind = spec[0] if spec else None
    opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None


def typed_value(text: str, spec, where: str):
    """The value ComfyUI's validation accepts for `text`, or QueueError naming the input, the value and the fix."""
    kind = spec[0] if spec else None
    opts = spec[1] if spec and len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = choices_of(spec)
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


def override_value(graph: dict, node: str, name: str, text: str, object_info: dict):
    """(node id, the typed value) of one --set/--sweep value, checked as apply_overrides checks it."""
    nid = resolve_node(graph, node)
    cls = graph[nid]["class_type"]
    names = known_inputs(object_info, cls)
    if names is None:
        names = set(graph[nid]["inputs"])
    if name not in names:
        raise QueueError(f"node {nid} ({cls}) has no input {name!r}; its inputs are: {', '.join(sorted(names))}.")
    spec = input_spec(object_info, cls, name)
    if spec is None and _is_link(graph[nid]["inputs"].get(name)):
        raise QueueError(f"{node}.{name} is a link from node {graph[nid]['inputs'][name][0]} in the graph, not a "
                         "value.")
    return nid, typed_value(text, spec, f"{node}.{name}")


def apply_overrides(graph: dict, overrides: list[tuple[str, str, str]], object_info: dict) -> dict:
    g = copy.deepcopy(graph)
    for node, name, text in overrides:
        nid, value = override_value(g, node, name, text, object_info)
        g[nid]["inputs"][name] = value
    return g


# inputs whose off-list values ComfyUI's own nodes accept, checking them in their validate_inputs (an annotated
# "x.png [output]", an uploaded file, a device or backend name): ComfyUI skips its choice check for these
SELF_CHECKED = {"image", "latent", "audio", "video", "file", "model_file", "choice", "attention", "device"}
FOLDERS = {"ckpt_name": "models/checkpoints", "lora_name": "models/loras", "vae_name": "models/vae",
           "unet_name": "models/diffusion_models", "clip_name": "models/text_encoders",
           "control_net_name": "models/controlnet", "clip_checkpoint": "models/clip",
           "catversion_name": "models/catversion"}


def check_graph_values(graph: dict, object_info: dict, skip: set = frozenset()) -> tuple[dict, list[str]]:
    """The graph's own values (those --set/--sweep do not replace, `skip`: (node id, input)) as ComfyUI will
    validate them, before anything is posted: (the graph to post, notes to print).

    - A combo value the server does not list (a checkpoint that is not in its models folder) is refused, for
      ComfyUI's own nodes and this pack's (ComfyUI refuses them the same way, but only once the run is posted, and
      a dry run would pass it); for other packs' nodes, which may accept more in their own validation, it is a note.
    - A BOOLEAN input holding text: ComfyUI reads any non-empty text as true, so "false" would run as true. The
      texts true/false are sent as the booleans they name (a note says so); any other text is refused."""
    g = copy.deepcopy(graph)
    notes = []
    for nid, node in g.items():
        cls = node.get("class_type")
        info = object_info.get(cls) or {}
        inputs = node.get("inputs") or {}
        for name, value in inputs.items():
            spec = input_spec(object_info, cls, name)
            if (nid, name) in skip or spec is None or _is_link(value):
                continue
            where = f"node {nid} ({cls}) {name}"
            if spec[0] == "BOOLEAN" and isinstance(value, str):
                if value.strip().lower() not in ("true", "false"):
                    raise QueueError(f"{where}={value!r}: a BOOLEAN input takes true or false (ComfyUI would read this "
                                     "text as true); write true or false, without quotes, in the workflow.")
                inputs[name] = value.strip().lower() == "true"
                notes.append(f"{where}: the text {value!r} is sent as {str(inputs[name]).lower()} (ComfyUI reads any "
                             f"non-empty text as true); write {str(inputs[name]).lower()} without quotes in the "
                             "workflow.")
                continue
            choices = choices_of(spec)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if choices is None or "remote" in opts or isinstance(value, list) or value in choices:
                continue
            shown = ", ".join(map(repr, choices[:8])) + (f", ... ({len(choices)} in all)" if len(choices) > 8 else "")
            listed = f"it lists {shown}" if choices else "it lists none"
            folder = FOLDERS.get(name.rstrip("0123456789"))
            fix = ((f"put the file in ComfyUI's {folder} folder (then restart or refresh the server), or "
                    if folder else "") + f"--set {nid}.{name}=<one it lists>")
            ours = cls.startswith("CAT_") or not str(info.get("python_module", "custom_nodes")).startswith(
                    "custom_nodes")
            if ours and name not in SELF_CHECKED:
                raise QueueError(f"{where} {value!r} is not on the server ({listed}); {fix}.")
            notes.append(f"{where} {value!r} is not among the server's choices ({listed}); ComfyUI refuses it unless "
                         "that node checks the input itself.")
    return g, notes


def check_node_types(graph: dict, object_info: dict) -> None:
    missing = sorted({v["class_type"] for v in graph.values()} - set(object_info))
    if missing:
        hint = (" Install ComfyUI-CAT into custom_nodes/ and restart the server."
                if any(m.startswith("CAT_") for m in missing) else "")
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
