"""Model families: one class per architecture (family.py) holding everything the trainer knows about it.

    family.py    Family and SDUNet, SDXLUNet, Flux, Flux2, Chroma, QwenImage, SD3: detection from a network, a LoRA
                 header and a checkpoint, names, kohya tags and key names, LoRA targets, checkpointed layers, APT's
                 default layers
    headers.py   safetensors headers read cheaply, and the family a LoRA or a checkpoint file says it is for
    ldm_names.py ldm to diffusers module names of SD UNets (kohya's SD LoRA keys)

Imports nothing of the method: every other part may ask a family. The names below are the public ones
(`families.of(net)`, `families.Flux`, `families.TARGETS`).
"""
from .family import (FAMILIES, GENERIC_TARGETS, SD3, TARGETS, Chroma, Family, Flux, Flux2, QwenImage, SDUNet, SDXLUNet,
                     kohya_base_version, named, of, target_suffixes, title)

__all__ = ["FAMILIES", "GENERIC_TARGETS", "SD3", "TARGETS", "Chroma", "Family", "Flux", "Flux2", "QwenImage", "SDUNet",
           "SDXLUNet", "kohya_base_version", "named", "of", "target_suffixes", "title"]
