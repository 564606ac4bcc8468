"""A warning when a queued graph applies a LoRA to a model of another family through ComfyUI's stock loaders.

LoraLoader / LoraLoaderModelOnly apply an SD1.5 LoRA to an SDXL or Flux model with nothing but console
"lora key not loaded" lines. This pack cannot change those nodes, so it looks at each graph as it is queued
(`PromptServer.add_on_prompt_handler`): for every stock LoRA loader it reads the LoRA's safetensors header and the
header of the checkpoint its MODEL comes from (cat_train/families/headers.py; no tensor is loaded), and on a mismatch
logs a warning and sends `cat.warning` to the client that queued it (web/cat_warnings.js shows a toast; `python -m
cat_train queue` prints it under its run, by the prompt id the event carries when the client chose one). The same hook
warns of a BOOLEAN input holding a text that means false ("false", "no", ...): ComfyUI's validation turns it into
bool(text), so it runs as true, and by then no node can tell (measured on 0.3.64 and 0.33). The graph is returned as
received: nothing is blocked or changed, and any failure here is swallowed (an odd graph must queue as it would
without this pack).
"""
from __future__ import annotations

import logging
from typing import Callable

from ..cat_train.families.headers import mismatch
from .common import model_file

log = logging.getLogger("ComfyUI-CAT")
EVENT = "cat.warning"
LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly")
MODEL_FOLDERS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models"}  # common.MODEL_FILE_INPUTS' folders


def lora_warnings(prompt, full_path: Callable[[str, str], str | None]) -> list[str]:
    """One sentence per stock LoRA loader in an API graph that applies a LoRA of another family than its MODEL's;
    full_path(folder, name): the file's path (folder_paths.get_full_path) or None."""
    if not isinstance(prompt, dict):
        return []
    out = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") not in LORA_LOADERS:
            continue
        inputs = node.get("inputs")
        lora = inputs.get("lora_name") if isinstance(inputs, dict) else None
        source = model_file(prompt, node_id)
        if not isinstance(lora, str) or source is None:
            continue
        lora_path, model_path = full_path("loras", lora), full_path(MODEL_FOLDERS[source[0]], source[1])
        if lora_path and model_path:
            problem = mismatch(lora_path, model_path)
            if problem:
                out.append(f"node {node_id} ({node['class_type']}): {problem}")
    return out


FALSE_TEXTS = ("false", "no", "off", "0", "none", "null", "disabled")


def boolean_text_warnings(prompt, input_types: Callable[[str], dict | None]) -> list[str]:
    """One sentence per BOOLEAN input of an API graph that holds a text meaning false ("false", "no", "off", ...),
    which ComfyUI reads as true (any non-empty text is); input_types(class_type): the class's INPUT_TYPES(), asked
    only of nodes holding such a text (a folder-listing INPUT_TYPES is not run on every queue)."""
    if not isinstance(prompt, dict):
        return []
    out = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        texts = {k: v for k, v in inputs.items() if isinstance(v, str) and v.strip().lower() in FALSE_TEXTS} \
            if isinstance(inputs, dict) else {}
        types = input_types(node.get("class_type")) if texts else None
        for name, value in texts.items() if isinstance(types, dict) else ():
            spec = (types.get("required") or {}).get(name) or (types.get("optional") or {}).get(name)
            if isinstance(spec, (list, tuple)) and spec and spec[0] == "BOOLEAN":
                out.append(f"node {node_id} ({node.get('class_type')}): {name} is the text {value!r}, which ComfyUI "
                           "reads as true (any non-empty text is); send false without quotes.")
    return out


def _input_types(class_type):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    return cls.INPUT_TYPES() if cls is not None else None


def on_prompt(json_data):
    """ComfyUI's on-prompt hook: warn, and return the request body untouched."""
    try:
        import folder_paths

        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        found = [("LoRA for another model family", lora_warnings(prompt, folder_paths.get_full_path)),
                 ("Text in a true/false input", boolean_text_warnings(prompt, _input_types))]
        for _, warnings in found:
            for w in warnings:
                log.warning("ComfyUI-CAT: %s", w)
        client = json_data.get("client_id")
        pid = json_data.get("prompt_id")
        for title, warnings in found:
            if warnings and client:  # only the client that queued it: on a shared server others did not
                from server import PromptServer

                PromptServer.instance.send_sync(EVENT, {"title": title, "warnings": warnings,
                                                        **({"prompt_id": pid} if isinstance(pid, str) else {})}, client)
    except Exception:  # never let a check stop or change a queue
        log.debug("ComfyUI-CAT: queue-time checks skipped", exc_info=True)
    return json_data


def register(server) -> bool:
    """Add the hook to a running PromptServer once (the pack may be loaded twice in one process)."""
    handlers = getattr(server, "on_prompt_handlers", None)
    if handlers is None:
        return False
    if not any(getattr(h, "__qualname__", "") == on_prompt.__qualname__ and getattr(h, "__module__", "") == __name__
               for h in handlers):
        server.add_on_prompt_handler(on_prompt)
    return True
