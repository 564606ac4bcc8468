"""Conditionings batched along the batch dimension, as ComfyUI batches them.

A batch of prompts of different token lengths (a long caption has more 77-token chunks) is brought to one length by
repeating each whole sequence, which leaves every caption's cross-attention as it was alone. A conditioning that
carries an "attention_mask" (1 per text token; families whose text tokens have positions, e.g. Qwen-Image) is
zero-padded to the longest instead, its mask marking the padding, which again leaves each caption as it was alone.
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


def common_length(conds: list[Cond], dim: int = 1) -> list[Cond]:
    """Conditionings whose context (and attention mask, where they carry one) have one length along `dim`: repeated
    whole (`repeat_to_common_length`), or zero-padded with the mask saying so."""
    if "attention_mask" not in conds[0]:
        contexts = repeat_to_common_length([c["context"] for c in conds], dim)
        return [{**c, "context": x} for c, x in zip(conds, contexts)]
    n = max(c["context"].shape[dim] for c in conds)

    def pad(x):
        extra = n - x.shape[dim]
        return x if not extra else torch.cat([x, x.new_zeros(*x.shape[:dim], extra, *x.shape[dim + 1:])], dim)
    return [{**c, "context": pad(c["context"]), "attention_mask": pad(c["attention_mask"])} for c in conds]


def cat_cond(*conds: Cond) -> Cond:
    """Stack conditionings along the batch (contexts of different token lengths repeated to a common one)."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys or any(c[k].shape[2:] != conds[0][k].shape[2:] for k in keys if k == "context") \
                or any(c[k].shape[1:] != conds[0][k].shape[1:] for k in keys if k not in ("context", "attention_mask")):
            raise ValueError("token and preservation conditionings differ in shape; encode both with the same text "
                             "encoder.")
    conds = common_length(list(conds))
    return {k: torch.cat([c[k] for c in conds]) for k in keys}
