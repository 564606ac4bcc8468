"""Conditionings batched along the batch dimension, as ComfyUI batches them.

A batch of prompts of different token lengths (a long caption has more 77-token chunks) is brought to one length by
repeating each whole sequence, which leaves every caption's cross-attention as it was alone.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .denoiser import Cond

log = logging.getLogger("cat_train")


def repeat_to_common_length(contexts: list[Tensor], dim: int = 1) -> list[Tensor]:
    """Token sequences of different lengths (a long caption has more 77-token chunks) brought to their least
    common multiple by repeating each whole, as ComfyUI batches conditionings: cross-attention over a
    sequence repeated k times equals attention over it once, so no caption changes another's result."""
    lengths = {c.shape[dim] for c in contexts}
    if len(lengths) == 1:
        return contexts
    n = math.lcm(*lengths)
    if n // min(lengths) > MAX_REPEAT:  # 20 and 21 chunks: 420 chunks, a step 100x slower and GBs more
        return _cyclic_to_longest(contexts, dim, max(lengths))
    return [c if c.shape[dim] == n else c.repeat(*[n // c.shape[dim] if d == dim else 1 for d in range(c.ndim)])
            for c in contexts]


# ComfyUI's own bound (comfy/conds.py CONDCrossAttn.can_concat): past 4x repetition it stops batching conditionings.
MAX_REPEAT = 4
_warned: set[tuple[int, ...]] = set()


def _cyclic_to_longest(contexts: list[Tensor], dim: int, n: int) -> list[Tensor]:
    """Lengths whose common multiple is too large (a trigger on a 75-token chunk boundary gives y_T one chunk more than
    y): each shorter sequence is repeated and cut at the longest length. Not exact as whole repeats are (the first
    chunks weigh a little more in attention), so it is said once per set of lengths."""
    key = tuple(sorted({c.shape[dim] for c in contexts}))
    if key not in _warned:
        _warned.add(key)
        log.warning("conditionings of %s tokens would be padded to their common multiple (%d tokens, %dx the "
                    "shortest); the shorter ones are repeated up to the longest (%d tokens) instead, an approximation. "
                    "Shorten long captions below 75 tokens, or keep the trigger away from a 75-token boundary, to "
                    "train them exactly.", " and ".join(map(str, key)), math.lcm(*key), math.lcm(*key) // key[0], n)
    out = []
    for c in contexts:
        k = c.shape[dim]
        if k != n:
            c = c.repeat(*[-(-n // k) if d == dim else 1 for d in range(c.ndim)]).narrow(dim, 0, n)
        out.append(c)
    return out


def cat_cond(*conds: Cond) -> Cond:
    """Stack conditionings along the batch (contexts of different token lengths repeated to a common one)."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys or any(c[k].shape[2:] != conds[0][k].shape[2:] for k in keys if k == "context") \
                or any(c[k].shape[1:] != conds[0][k].shape[1:] for k in keys if k != "context"):
            raise ValueError("token and preservation conditionings differ in shape; encode both with the same text "
                             "encoder.")
    return {k: torch.cat(repeat_to_common_length([c[k] for c in conds]) if k == "context" else [c[k] for c in conds])
            for k in keys}
