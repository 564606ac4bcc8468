"""LoRA weights <-> kohya state dicts for a ComfyUI model, and safe file names in the loras folder.

Kohya keys use diffusers module paths; ComfyUI maps ldm <-> diffusers with `comfy.utils.unet_to_diffusers`
for the model's own unet_config, so the names match what the stock LoraLoader expects for that model.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch


class CatLora(dict):
    """LORA_MODEL (a plain state dict, so stock LoRA nodes accept it) that also carries header metadata."""
    metadata: dict[str, str] = {}


def ldm_to_kohya_names(unet_config: dict, module_paths) -> dict[str, str]:
    import comfy.utils

    to_ldm = comfy.utils.unet_to_diffusers(unet_config)  # {"down_blocks....weight": "input_blocks....weight"}
    by_ldm = {v[: -len(".weight")]: k[: -len(".weight")] for k, v in to_ldm.items() if k.endswith(".weight")}
    out = {}
    for p in module_paths:
        diff = by_ldm.get(p)
        if diff is None:
            raise ValueError(f"no diffusers name for UNet module {p!r}; this model's layout is not an SD UNet ComfyUI can map.")
        out[p] = "lora_unet_" + diff.replace(".", "_")
    return out


def to_kohya_state_dict(weights: dict, unet_config: dict) -> dict[str, torch.Tensor]:
    """{ldm path: LoraWeights} -> kohya keys (lora_down/lora_up/alpha), fp32, contiguous, on CPU."""
    names = ldm_to_kohya_names(unet_config, weights)
    sd = {}
    for path, w in weights.items():
        k = names[path]
        sd[f"{k}.lora_down.weight"] = w.down.detach().float().cpu().contiguous()
        sd[f"{k}.lora_up.weight"] = w.up.detach().float().cpu().contiguous()
        sd[f"{k}.alpha"] = torch.tensor(float(w.alpha))
    return sd


_BAD_NAME = "names a path outside the loras folder"


def safe_lora_path(folder: str | os.PathLike, name: str) -> Path:
    """folder/name.safetensors, numbered (name_00001...) so nothing is overwritten; refuses escapes."""
    stem = safe_subpath(folder, name)
    path = stem.with_name(stem.name + ".safetensors")
    n = 0
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}_{n:05d}.safetensors")
    return path


def safe_subpath(folder: str | os.PathLike, name: str) -> Path:
    """folder/name resolved, refusing '..', absolute paths, drive letters and backslashes."""
    raw = name.strip()
    if raw.endswith(".safetensors"):
        raw = raw[: -len(".safetensors")]
    if (not raw or ".." in Path(raw).parts or ".." in raw.split("/") or os.path.isabs(raw) or "\\" in raw
            or re.match(r"^[A-Za-z]:", raw) or raw.startswith(("/", "~"))):
        raise ValueError(f"LoRA name {name!r} {_BAD_NAME} or is empty; use a plain name such as 'my_concept' "
                         "(a subfolder like 'cat/my_concept' is fine).")
    base = Path(folder).resolve()
    stem = (base / raw).resolve()
    if base not in stem.parents:
        raise ValueError(f"LoRA name {name!r} {_BAD_NAME}; use a plain name such as 'my_concept'.")
    return stem


def save_kohya(path: Path, sd: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)  # atomic: a crash never leaves half a LoRA under the final name
    return path
