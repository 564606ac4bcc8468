"""Model families: one class per architecture holding everything the trainer knows about it.

    family.py    Family: what a family answers (detection from a network, a LoRA header and a checkpoint, names,
                 kohya tags and key names, LoRA targets, checkpointed layers, APT's default layers)
    unets.py     SDUNet, SDXLUNet, SD3
    flux.py      Flux, Flux2, Chroma
    dits.py      QwenImage, NextDiT (Lumina2, ZImage), Wan, HiDream
    registry.py  FAMILIES in the order their targets are offered, and the lookups (of, named, title, ...)
    headers.py   safetensors headers read cheaply, and the family a LoRA or a checkpoint file says it is for
    ldm_names.py ldm to diffusers module names of SD UNets (kohya's SD LoRA keys)

Imports nothing of the method: every other part may ask a family. The names below are the public ones
(`families.of(net)`, `families.Flux`, `families.TARGETS`).
"""
from .dits import HiDream, Lumina2, NextDiT, QwenImage, Wan, ZImage
from .family import GENERIC_TARGETS, Family
from .flux import Chroma, Flux, Flux2
from .registry import FAMILIES, TARGETS, kohya_base_version, named, of, target_suffixes, title
from .unets import SD3, SDUNet, SDXLUNet

__all__ = ["FAMILIES", "GENERIC_TARGETS", "SD3", "TARGETS", "Chroma", "Family", "Flux", "Flux2", "QwenImage", "SDUNet",
           "SDXLUNet", "kohya_base_version", "named", "of", "target_suffixes", "title"]
__all__ += ["HiDream", "Lumina2", "NextDiT", "Wan", "ZImage"]
