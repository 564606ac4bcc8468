"""Which model family a LoRA file was trained for, and which a checkpoint file holds, from their safetensors headers.

Only the header is read (its JSON: metadata, tensor names and shapes; a few KB to a few MB), never a tensor, so a
LoRA about to be applied to another family can be named cheaply before anything runs. ComfyUI's stock LoRA loaders
apply an SD1.5 LoRA to an SDXL or Flux model without a word beyond console "lora key not loaded" lines.
What marks each family's files is that family's class (family.py: `lora_tags`, `lora_keys_say`, `checkpoint_says`);
families are returned by name, None where the file does not say (no warning then).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .registry import FAMILIES, title

HEADER_LIMIT = 64 * 2**20  # a real header is far smaller; a larger length field means "not safetensors"
_CACHE: dict[tuple[str, int, int], dict | None] = {}  # (path, size, mtime_ns) -> header: a queue re-reads nothing


def read_header(path: str | os.PathLike) -> dict | None:
    """The safetensors header ({tensor: {dtype, shape, ...}, "__metadata__": {...}}), or None for another file."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _CACHE:
            _CACHE[key] = _read(p, st.st_size)
        return _CACHE[key]
    except OSError:
        return None


def _read(p: Path, size: int) -> dict | None:
    if p.suffix.lower() not in (".safetensors", ".sft"):
        return None  # .ckpt/.pt are pickles: nothing cheap to read
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > min(HEADER_LIMIT, size - 8):
            return None
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return None
    return header if isinstance(header, dict) else None


def lora_family(header: dict | None) -> str | None:
    """From ss_base_model_version, else from key names that only one family's LoRAs have."""
    if not header:
        return None
    version = str((header.get("__metadata__") or {}).get("ss_base_model_version", "")).strip().lower()
    # the longest tag that matches: "flux2" is Flux.2's, not Flux's "flux"
    tagged = [(len(tag), f) for f in FAMILIES for tag in f.lora_tags if version.startswith(tag)]
    found = max(tagged, key=lambda lf: lf[0])[1] if tagged else None
    if found is None:
        keys = [k for k in header if k != "__metadata__"]
        # a subclass's marks first (Flux.2's keys are Flux's and more)
        found = next((f for f in sorted(FAMILIES, key=lambda f: -len(f.__mro__)) if f.lora_keys_say(keys)), None)
    return found.name if found else None


def model_family(header: dict | None) -> str | None:
    """From the denoiser's key names in a checkpoint (model.diffusion_model.*) or a diffusion-model file (bare)."""
    if not header:
        return None
    tensors = {k.removeprefix("model.diffusion_model."): v for k, v in header.items() if k != "__metadata__"}
    found = next((f for f in FAMILIES if f.checkpoint_says(tensors)), None)  # diffusers layout and others: not ours
    return found.name if found else None


def mismatch(lora_path, model_path) -> str | None:
    """A sentence naming both files and families when the LoRA was trained for another family than the model's."""
    lora, model = lora_family(read_header(lora_path)), model_family(read_header(model_path))
    if lora is None or model is None or lora == model:
        return None
    return (f"LoRA {Path(lora_path).name} was trained for {title(lora)}, but the model it is applied to "
            f"({Path(model_path).name}) is {title(model)}: most of its weights will not load (ComfyUI logs "
            f"'lora key not loaded') and the rest change the model at random; use a LoRA trained for "
            f"{title(model)}, or apply this one to a {title(lora)} model.")
