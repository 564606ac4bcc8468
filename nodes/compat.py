"""What differs between the ComfyUIs the pack supports (v0.3.64, the oldest, to v0.33, what users run now), asked of
the host itself.

One code path for every version: each function here checks for a feature (a field, a parameter, a flag), never a
version number, so a ComfyUI between or after the tested ones gets whatever it actually has. Each is small and
self-contained, and its docstring names the upstream change it answers; callers use the answer, not the version.
Nothing here is copied from ComfyUI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Iterator


@contextlib.contextmanager
def training_passes() -> Iterator[None]:
    """`comfy.model_management.in_training` (v0.33; v0.3.64 has no such flag): unset, Flux's `apply_rope`
    (comfy/ldm/flux/math.py) runs a comfy_kitchen kernel that has no backward; set, the plain torch ops that
    ComfyUI's own trainer uses. Set for the whole training run, backwards included (a checkpointed block runs its
    forward again there), and back to what it was on return, error or Cancel: sampling elsewhere keeps the fast
    kernels."""
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


def is_dynamic(mp) -> bool:
    """DynamicVRAM (v0.33, the default on NVIDIA and recent AMD GPUs: `ModelPatcherDynamic`, `is_dynamic()`):
    the weights stay in CPU memory and are streamed to the GPU per layer call. v0.3.64 patchers have no such mode."""
    check = getattr(mp, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def training_patcher(mp):
    """The patcher whose network the trainer loads and trains: `mp` itself, or for a DynamicVRAM MODEL a non-dynamic
    clone (`clone(disable_dynamic=True)`, v0.33), which loads its own copy of the weights through the loader that
    made the MODEL and carries the MODEL's patches. Training needs the weights resident on the load device: streamed,
    the parameters stay in CPU memory, where the trainer takes its device from, so it would train on the CPU."""
    if not is_dynamic(mp):
        return mp
    if getattr(mp, "cached_patcher_init", None) is None:
        raise ValueError("the MODEL input is loaded with ComfyUI's DynamicVRAM (weights streamed to the GPU per call, "
                         "which training cannot use) by a loader that cannot load it again without it: load the model "
                         "with a core loader (Load Checkpoint, Load Diffusion Model), or start ComfyUI with "
                         "--disable-dynamic-vram.")
    return mp.clone(disable_dynamic=True)


@functools.cache
def schema_takes_search_aliases() -> bool:
    """comfy_api's io.Schema gained `search_aliases` (words the node search also matches; used across comfy_extras
    since late 2025). v0.3.64's Schema has no such field and would refuse the keyword."""
    from comfy_api.latest import io

    return "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def search_aliases(*words: str) -> dict:
    """io.Schema keywords: the aliases where the host's Schema takes them, nothing where it does not."""
    return {"search_aliases": list(words)} if schema_takes_search_aliases() else {}


@functools.cache
def input_takes_advanced(comfy_type) -> bool:
    """comfy_api's inputs gained `advanced=` (the new frontend folds such widgets under the node's "advanced inputs"
    until the user opens them). v0.3.64's inputs have no such parameter and would refuse the keyword."""
    return "advanced" in inspect.signature(comfy_type.Input.__init__).parameters


def advanced(comfy_type) -> dict:
    """Keywords for `comfy_type.Input(...)`: marked advanced where the host's input takes the flag."""
    return {"advanced": True} if input_takes_advanced(comfy_type) else {}


@functools.cache
def qwen_image_masks_text() -> bool:
    """Qwen-Image's joint attention honours the text attention mask (`encoder_hidden_states_mask`) since the rework
    that moved it to BHND layout (after v0.3.64). Before, the mask reached the attention block and was dropped, so the
    zero-padded captions a training batch of different caption lengths needs would attend to their padding."""
    from comfy.ldm.qwen_image.model import Attention

    return "encoder_hidden_states_mask is not None" in inspect.getsource(Attention.forward)
