"""What differs between the ComfyUIs the pack supports (v0.3.64 to v0.33), asked of the host itself.

One code path for every version: each function here checks for a feature (a field, a parameter, a function), never
a version number, so a ComfyUI between or after the tested ones gets whatever it actually has. Each is small and
self-contained, and its comment names the upstream change it answers; callers use the answer, not the version.
Nothing here is copied from ComfyUI.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect


@functools.cache
def schema_takes_search_aliases() -> bool:
    """comfy_api's io.Schema gained `search_aliases` (words the node search also matches; used across comfy_extras
    since late 2025). v0.3.64's Schema has no such field and would refuse the keyword."""
    from comfy_api.latest import io

    return "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def search_aliases(*words: str) -> dict:
    """io.Schema keywords: the aliases where the host's Schema takes them, nothing where it does not."""
    return {"search_aliases": list(words)} if schema_takes_search_aliases() else {}


@functools.cache
def input_takes_advanced(comfy_type) -> bool:
    """comfy_api's inputs gained `advanced=` (the new frontend folds such widgets under the node's "advanced inputs"
    until the user opens them). v0.3.64's inputs have no such parameter and would refuse the keyword."""
    return "advanced" in inspect.signature(comfy_type.Input.__init__).parameters


def advanced(comfy_type) -> dict:
    """Keywords for `comfy_type.Input(...)`: marked advanced where the host's input takes the flag."""
    return {"advanced": True} if input_takes_advanced(comfy_type) else {}
