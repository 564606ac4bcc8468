"""Will this run fit? A memory budget printed before step 1, and the knobs that make it fit.

    weights      the base model as loaded (resident already; never converted)
    adapter      LoRA parameters, their gradients and AdamW's two moments: 16 bytes a parameter (fp32)
    activations  what the adapted forward saves for backward, measured by a probe forward at batch 1
                 (every leaf module's output, in the compute dtype) and scaled to the adapted batch
                 (2B with the CAT term: y_T and y in one pass; B for plain LoRA)

With gradient checkpointing only the checkpointed layers' outputs stay, plus one layer's insides
and their gradients while it is recomputed (3x the largest layer's insides). Activations the probe cannot see
(attention reshapes, residual sums, GELU
inside GEGLU) are covered by `OVERHEAD`, measured on SD-shaped UNets (benchmarks/memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

OVERHEAD = 1.6   # measured activations / probed leaf outputs (benchmarks/memory.py), rounded up
HEADROOM = 0.9   # plan to use at most this share of what the device reports free
GiB = 1024 ** 3


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def adapter_bytes(n_params: int) -> int:
    """fp32 weight + grad + AdamW exp_avg + exp_avg_sq."""
    return 16 * n_params


@dataclass
class ActivationProbe:
    plain: int          # bytes saved for backward at batch 1, no checkpointing
    checkpointed: int   # same with every unit checkpointed


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


@torch.no_grad()
def probe_activations(module: nn.Module, forward: Callable[[], object],
                      units: Sequence[nn.Module] = ()) -> ActivationProbe:
    """Run `forward` once (batch 1) with hooks on every leaf module; no grad, nothing kept."""
    total = 0
    per_unit: dict[int, int] = {}
    boundary = 0
    stack: list[int] = []

    def leaf_hook(_m, _i, out):
        nonlocal total
        b = tensor_bytes(_outputs(out))
        total += b
        if stack:
            per_unit[stack[-1]] = per_unit.get(stack[-1], 0) + b

    def unit_pre(m, _i):
        stack.append(id(m))

    def unit_post(m, _i, out):
        nonlocal boundary
        stack.pop()
        boundary += tensor_bytes(_outputs(out))

    handles = [m.register_forward_hook(leaf_hook) for m in module.modules() if not any(True for _ in m.children())]
    for u in units:
        handles += [u.register_forward_pre_hook(unit_pre), u.register_forward_hook(unit_post)]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    outside = total - sum(per_unit.values())
    # while one unit is recomputed in backward its insides, their gradients and its input's gradient are alive
    ckpt = outside + boundary + 3 * max(per_unit.values(), default=0)
    return ActivationProbe(plain=int(total * OVERHEAD), checkpointed=int(ckpt * OVERHEAD))


class DoesNotFit(RuntimeError):
    pass


@dataclass
class MemoryBudget:
    weights: int
    adapter: int
    activations_plain: int
    activations_checkpointed: int
    free: int | None        # None: unknown (no limit checked)
    device: str = "cpu"

    def need(self, checkpointing: bool) -> int:
        return self.adapter + (self.activations_checkpointed if checkpointing else self.activations_plain)

    def fits(self, checkpointing: bool) -> bool:
        return self.free is None or self.need(checkpointing) <= HEADROOM * self.free

    def choose_checkpointing(self, setting: str) -> bool:
        """'on'/'off' as asked; 'auto': off when it fits without, else on."""
        if setting not in ("auto", "on", "off"):
            raise ValueError(f"gradient_checkpointing must be auto, on or off, got {setting!r}.")
        return setting == "on" or (setting == "auto" and not self.fits(False))

    def report(self, checkpointing: bool) -> str:
        act = self.activations_checkpointed if checkpointing else self.activations_plain
        free = "unknown" if self.free is None else f"{self.free / GiB:.2f} GiB"
        return (f"memory budget on {self.device}: weights {self.weights / GiB:.2f} GiB (resident), "
                f"LoRA + AdamW {self.adapter / GiB:.3f} GiB, activations {act / GiB:.2f} GiB "
                f"(gradient checkpointing {'on' if checkpointing else 'off'}), "
                f"needed on top of the weights {self.need(checkpointing) / GiB:.2f} GiB, free {free}")

    def check(self, checkpointing: bool, batch: int, resolution: tuple[int, int], rank: int) -> None:
        if self.fits(checkpointing):
            return
        knobs = []
        if not checkpointing:
            knobs.append(f"turn on gradient_checkpointing (needs {self.need(True) / GiB:.2f} GiB)")
        if batch > 1:
            knobs.append(f"lower batch_size to 1 and raise grad_accum to {batch}")
        w, h = resolution
        knobs += [f"lower the resolution (now {w}x{h}; activations scale with the pixel count)",
                  f"lower the rank (now {rank}) or use the 'attn' target preset",
                  "close other programs using the GPU"]
        raise DoesNotFit(f"this run does not fit: {self.report(checkpointing)}. To make it fit: {'; '.join(knobs)}.")

