"""Where the ComfyUI versions the pack supports differ, as feature checks (never version numbers): one function per
upstream change, its docstring naming the change. v0.3.64 is the oldest supported; v0.33 is what users run now."""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def training_passes() -> Iterator[None]:
    """`comfy.model_management.in_training` (v0.33; v0.3.64 has no such flag): unset, Flux's `apply_rope`
    (comfy/ldm/flux/math.py) runs a comfy_kitchen kernel that has no backward; set, the plain torch ops that
    ComfyUI's own trainer uses. Set for the trainer's forwards and backwards, back to what it was on return,
    error or Cancel: sampling elsewhere keeps the fast kernels."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before
