"""The LORA object the nodes pass around, and safe file names in the loras folder.

The file format itself (kohya keys, atomic writes, metadata) is cat_train.adapters.export's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path



class CatLora(dict):
    """LORA_MODEL (a plain state dict, so stock LoRA nodes accept it) that also carries header metadata."""
    metadata: dict[str, str] = {}


def safe_lora_path(folder: str | os.PathLike, name: str) -> Path:
    """folder/name.safetensors, numbered (name_00001...) so nothing is overwritten; refuses escapes."""
    stem = safe_subpath(folder, name)
    path = stem.with_name(stem.name + ".safetensors")
    n = 0
    while path.exists():
        n += 1
        path = stem.with_name(f"{stem.name}_{n:05d}.safetensors")
    return path


def safe_subpath(folder: str | os.PathLike, name: str, field: str = "LoRA name", where: str = "the loras folder",
                 example: str = "my_concept") -> Path:
    """folder/name resolved, refusing '..', absolute paths, drive letters and backslashes.

    `field` is the input the name came from, so the error points at the widget to fix (the trainer's
    checkpoint_name shares these rules with LoRA names).
    """
    if not isinstance(name, str):
        raise ValueError(f"{field} must be text, got {type(name).__name__}.")
    raw = name.strip()
    if raw.endswith(".safetensors"):
        raw = raw[: -len(".safetensors")]
    fix = f"use a plain name such as '{example}' (a subfolder like 'cat/{example}' is fine)."
    if not raw:
        raise ValueError(f"{field} is empty; {fix}")
    if (".." in Path(raw).parts or ".." in raw.split("/") or os.path.isabs(raw) or "\\" in raw
            or re.match(r"^[A-Za-z]:", raw) or raw.startswith(("/", "~"))):
        raise ValueError(f"{field} {name!r} names a path outside {where}; {fix}")
    too_long = [part for part in Path(raw).parts if len(part.encode()) > name_limit(folder)]
    if too_long:
        part = too_long[0]
        raise ValueError(f"{field} {part[:24]!r}... is {len(part.encode())} bytes long: this filesystem allows "
                         f"{name_limit(folder) + NAME_RESERVE} per file name and the saved files add up to "
                         f"{NAME_RESERVE} ('_step000000_00001.safetensors'); use at most {name_limit(folder)} "
                         "characters per folder or name.")
    base = Path(folder).resolve()
    stem = (base / raw).resolve()
    if base not in stem.parents:
        raise ValueError(f"{field} {name!r} names a path outside {where}; {fix}")
    return stem


NAME_RESERVE = 32  # what the writers add to a name: '_stepNNNNNN', '_NNNNN', '.safetensors', 'cat-stepNNNNNN.pt'


def name_limit(folder: str | os.PathLike) -> int:
    """Bytes a name typed into a node may have: the filesystem's limit (255 almost everywhere) less NAME_RESERVE."""
    q = Path(folder).absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    try:
        limit = os.pathconf(q, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    return max(1, min(limit, 255) - NAME_RESERVE)


def name_problem(folder: str | os.PathLike, name, field: str, where: str, example: str) -> bool | str:
    """For a node's validate_inputs: True, or the reason ComfyUI shows before the graph runs (a linked,
    not yet known name passes; execute checks it again)."""
    if name is None:
        return True
    try:
        safe_subpath(folder, name, field, where, example)
    except ValueError as e:
        return str(e)
    return True
