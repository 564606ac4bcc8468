"""Proof that a shared model came back as it was lent: a checksum per tensor, not a second copy.

A trainer that borrows the user's UNet must hand it back bit-identical, dtype and device included.
Cloning every weight to compare would double the memory the low-precision rules exist to save, so
each tensor is reduced to (dtype, device, shape, sum, position-weighted sum) of its raw bits: any
changed bit, reordering, cast or move shows up (a collision needs a change that keeps both sums).
"""
from __future__ import annotations

import torch
from torch import nn

Fingerprint = tuple[str, str, tuple[int, ...], int, int]
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # bounds the int64 temporaries to 32 MiB however large the tensor


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor) -> Fingerprint:
    flat = t.detach().reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.dtype != torch.bool else flat.to(torch.uint8)
    s1 = s2 = 0
    for start in range(0, bits.numel(), _CHUNK):
        c = bits[start:start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + c.numel(), device=c.device, dtype=torch.int64) % 65521 + 1
        s1 += int(c.sum())
        s2 += int((c * pos).sum())
    return str(t.dtype), str(t.device), tuple(t.shape), s1, s2


def module_fingerprint(module: nn.Module) -> dict[str, Fingerprint]:
    """Every parameter and buffer, by name (what `state_dict` would hold, without copying it)."""
    out = {f"param:{n}": tensor_fingerprint(p) for n, p in module.named_parameters(remove_duplicate=False)}
    out.update({f"buffer:{n}": tensor_fingerprint(b) for n, b in module.named_buffers(remove_duplicate=False)
                if b is not None})
    return out


def changed(before: dict[str, Fingerprint], after: dict[str, Fingerprint]) -> list[str]:
    """Names whose tensor differs in bits, dtype, device or shape, or that appeared or vanished."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
