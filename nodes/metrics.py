"""PS / IS / KPS from CLIP embeddings (prefers cat_train.metrics when the core provides it).

S_C = cosine similarity, H = harmonic mean over pairs; similarities <= 0 are clamped to 1e-6 (the
limit H -> 0) and the count of clamped values is reported, as the README documents.
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOOR = 1e-6


def harmonic(sims: Tensor) -> tuple[float, int]:
    clamped = int((sims <= FLOOR).sum())
    s = sims.double().clamp_min(FLOOR)
    return float(len(s) / (1.0 / s).sum()), clamped


def pair_cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def scores(img_token: Tensor, img_plain: Tensor, img_ref: Tensor | None, txt: Tensor | None) -> dict:
    """Embeddings (N, D). img_ref may hold 1 row (broadcast) or N; txt N rows of prompt embeddings."""
    out = {}
    kps_h, kps_c = harmonic(pair_cos(img_plain, img_token))
    out["KPS"], out["KPS_clamped"] = 1.0 - kps_h, kps_c
    if txt is not None:
        out["PS"], out["PS_clamped"] = harmonic(pair_cos(txt, img_token))
    if img_ref is not None:
        ref = img_ref if len(img_ref) == len(img_token) else img_ref.mean(0, keepdim=True).expand_as(img_token)
        out["IS"], out["IS_clamped"] = harmonic(pair_cos(ref, img_token))
    out["pairs"] = len(img_token)
    return out
