"""The family class: what the trainer knows about an architecture, asked as class attributes and methods.

A family says how to recognise its network (by the module tree alone, never by a host's classes), its LoRA
files (the kohya base-version tag and key names in a safetensors header) and its checkpoints (the denoiser's
tensor names), what users call it, which module paths each LoRA target choice adapts, how kohya spells its
LoRA keys, which layers gradient checkpointing wraps, which norms need a copy of their input while training,
the kohya base-version tag of its checkpoints and APT's default layers. The families themselves are one class each,
in the module of their kind of network (unets.py, flux.py, dits.py), listed in registry.FAMILIES. Adding a family =
one class there and in FAMILIES, one line in nodes/comfy_model.py (which of ComfyUI's model classes it was written
for), a tiny model in tests/families/ (or tests/comfy/ when only the host can build one) and a row in
docs/families.md.
Style model: k-diffusion's external.py, one small class per model family.
"""
from __future__ import annotations

import re
from typing import ClassVar

from torch import nn


# peft wrapper internals: not the network's modules
_PEFT = re.compile(r"\.(base_layer|lora_[A-Za-z_]+|hada_\w+|lokr_\w+)(\.|$)")
GENERIC_TARGETS = ("attn", "attn_ff", "full")  # the trainer's choices every family answers with its own


class Family:
    """An architecture as the trainer sees it. Used as a class (no instances): `families.of(net).kohya_names(net)`."""

    name: ClassVar[str]               # its key in run settings and messages: "this {name} model"
    title: ClassVar[str]              # what users call it: "SD1.x/SD2"
    flow_matching: ClassVar[bool]     # its checkpoints sample as rectified flow (else DDPM eps/v)
    # target choice -> module-path suffixes it adapts; each choice includes the ones before it
    targets: ClassVar[dict[str, tuple[str, ...]]]
    generic: ClassVar[dict[str, str]] = {}    # 'attn'/'attn_ff'/'full' -> this family's own choice
    # host model-config class name (ComfyUI's supported_models) -> kohya's ss_base_model_version
    base_versions: ClassVar[dict[str, str]] = {}
    # APT's default regexes (full match of module names); None: APT has no default layers for this family
    apt_stabilize_layers: ClassVar[str | None] = None
    apt_align_layers: ClassVar[str | None] = None
    apt_block_layers: ClassVar[str | None] = None  # stabilize_layers of the earlier (block-output) choice
    # ss_base_model_version prefixes of its LoRAs (kohya's sd-scripts, and this pack's own `base_versions`)
    lora_tags: ClassVar[tuple[str, ...]] = ()
    # its networks' distilled guidance input while training (None: no such input)
    training_guidance: ClassVar[float | None] = None
    # its network must see each prompt's tokens alone: its attention gives caption tokens positions (joint attention
    # with RoPE over the caption), so a prompt repeated to a batch's common length would change its result
    whole_prompts: ClassVar[bool] = False
    # its text sequences are batched by zero-padding with an attention mask (else by repeating each whole)
    padded_text: ClassVar[bool] = False

    @classmethod
    def detect(cls, net: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def lora_keys_say(cls, keys: list[str]) -> bool:
        """Whether a LoRA's tensor names are ones only this family's LoRAs have (a file without a version tag)."""
        return False

    @classmethod
    def checkpoint_says(cls, tensors: dict[str, object]) -> bool:
        """Whether a checkpoint's denoiser tensors ({name without "model.diffusion_model.": header entry}) are this
        family's network."""
        return False

    @classmethod
    def target_choice(cls, choice: str) -> str:
        """The choice that applies on this family: 'attn'/'attn_ff'/'full' become the family's own."""
        return cls.generic.get(choice, choice)

    @classmethod
    def preset_hint(cls) -> str:
        return ", ".join(GENERIC_TARGETS) + (f" or {cls.name}_*" if cls.generic else "")

    @classmethod
    def kohya_names(cls, net: nn.Module) -> dict[str, str]:
        """{module path: the path its kohya key spells}: the network's own names, as kohya's sd-scripts
        names Flux and SD3 LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI's loader maps."""
        return {n: n for n, _ in net.named_modules() if n and not _PEFT.search(n)}

    @classmethod
    def checkpoint_units(cls, net: nn.Module) -> list[nn.Module]:
        """The layers gradient checkpointing wraps, one by one."""
        raise NotImplementedError

    @classmethod
    def inplace_norms(cls, net: nn.Module) -> list[nn.Module]:
        """Norms whose input the network then updates in place: autograd refuses that once the norm saved
        the tensor for backward, so while training they get a copy of their input."""
        return []
