"""Adapter kinds the loop trains, and which one a spec asks for (the shape of ComfyUI's comfy/weight_adapter registry).

LoRA lives here as a `plugins.Adapter` over lora.py's functions; CatVersion, whose adapter needs the text
encoders and their encode function, is built by catversion.train_catversion and passed to the loop directly.
"""
from __future__ import annotations

from typing import ContextManager

import torch
from torch import nn

from .lora import (LoraSpec, adapter_disabled, adapter_parameters, inject_lora, load_lora_state, lora_state,
                      lora_weights, remove_lora)
from ..step.denoiser import Denoiser
from ..step.plugs import Adapter


class LoraAdapter(Adapter):
    """LoRA (or DoRA, LoHa, LoKr: the spec's algorithm) in the denoiser's network through peft. A checkpoint keeps
    format 1's keys: "lora" ({module: {tensor name: tensor, "alpha"}}) and "spec"."""

    name = "lora"
    size_hint = "the LoRA rank"

    def __init__(self, spec: LoraSpec):
        self.spec, self.module = spec, None

    def install(self, denoiser: Denoiser, gen: torch.Generator) -> None:
        self.module = denoiser.module
        inject_lora(self.module, self.spec)  # A's init draws from the global RNG, which the loop seeded

    def parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.module)

    def disabled(self) -> ContextManager:
        return adapter_disabled(self.module)

    def state_dict(self) -> dict:
        return {"lora": lora_state(self.module), "spec": self.spec.saved()}

    def load_state_dict(self, state: dict, where: str) -> None:
        saved = LoraSpec(**{**state["spec"], "extra_targets": tuple(state["spec"].get("extra_targets", ()))})
        if saved != self.spec:
            raise ValueError(f"checkpoint {where} was trained with {saved}, not {self.spec}; resume with the same LoRA settings.")
        load_lora_state(self.module, state["lora"])

    def weights(self) -> dict:
        return lora_weights(self.module)

    def remove(self) -> None:
        remove_lora(self.module)


KINDS: dict[type, type[Adapter]] = {LoraSpec: LoraAdapter}  # spec class -> the adapter it configures
AdapterSpec = LoraSpec  # the specs KINDS knows (a Union once it knows more)


def adapter_for(spec: LoraSpec | Adapter) -> Adapter:
    if isinstance(spec, Adapter):
        return spec
    if type(spec) not in KINDS:
        raise TypeError(f"no adapter kind is configured by a {type(spec).__name__}; pass a LoraSpec or an Adapter.")
    return KINDS[type(spec)](spec)
