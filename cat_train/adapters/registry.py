"""Adapter kinds the loop trains, and which one a spec asks for (the shape of ComfyUI's comfy/weight_adapter registry).

LoRA (and its algorithms) is `lora.LoraAdapter`; CatVersion, whose adapter needs the text encoders and their encode
function, is built by its trainer (training/catversion.py) and passed to the loop directly.
"""
from __future__ import annotations

from ..step.plugs import Adapter
from .lora import LoraAdapter, LoraSpec

KINDS: dict[type, type[Adapter]] = {LoraSpec: LoraAdapter}  # spec class -> the adapter it configures
AdapterSpec = LoraSpec  # the specs KINDS knows (a Union once it knows more)


def adapter_for(spec: LoraSpec | Adapter) -> Adapter:
    if isinstance(spec, Adapter):
        return spec
    if type(spec) not in KINDS:
        raise TypeError(f"no adapter kind is configured by a {type(spec).__name__}; pass a LoraSpec or an Adapter.")
    return KINDS[type(spec)](spec)
