"""The LORA object the nodes pass around, and safe file names in the loras folder.

The file format itself (kohya keys, atomic writes, metadata) is cat_train.export's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path



class CatLora(dict):
    """LORA_MODEL (a plain state dict, so stock LoRA nodes accept it) that also carries header metadata."""
    metadata: dict[str, str] = {}


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
