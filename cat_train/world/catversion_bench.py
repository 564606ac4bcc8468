"""CatVersion rows of `bench kps`: `catversion` (as published: diffusion loss only) and `catversion+cat<alpha>`.

The world's text encoder has 2 self-attention layers, so "the last 3" of the paper become both of them;
one embedding per layer, N(0, 1) init, the paper's lr 1e-2 and batch 2 (not the LoRA rows' lr), the same
steps, seeds, images and captions (with the trigger) as the other methods. The embeddings act on every
prompt the encoder sees, the unconditional "" of classifier-free guidance included, as in the authors'
sampler: images without the trigger are drawn with them too, as the other rows draw them with their LoRA.
"""
from __future__ import annotations

import math

from ..catversion import PAPER_LAYERS, CatVersionConfig, CatVersionSpec, find_self_attention, installed, train_catversion

LR, BATCH = 1e-2, 2  # the paper's (5e-3 base rate x batch 2)


def catversion_alpha(m: str) -> float:
    """'catversion' -> 0.0; 'catversion+cat1' -> 1.0; anything else: ValueError."""
    if m == "catversion":
        return 0.0
    head, plus, tail = m.partition("+")
    if head != "catversion" or not plus or not tail.startswith("cat"):
        raise ValueError(f"unknown CatVersion method {m!r}; use catversion or catversion+cat<alpha> (e.g. catversion+cat1)")
    alpha = float(tail[3:])
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"CAT factor in {m!r} must be a number >= 0")
    return alpha


def catversion_label(m: str) -> str:
    a = catversion_alpha(m)
    return "CatVersion" if a == 0 else f"CatVersion + CAT (α={a:g})"


def run_catversion(world, m: str, c, seed: int, ps: dict, noise: dict, identity_items: list[tuple], class_word: str):
    """Train on the identity images (the bench's (latent, caption, triggers) items and class word, passed in so
    this module does not import the bench back), then draw the bench's prompts with the embeddings installed:
    (images, result)."""
    spec = CatVersionSpec(layers=min(PAPER_LAYERS, len(find_self_attention(world.text))))
    cfg = CatVersionConfig(steps=c.steps, lr=LR, batch_size=BATCH, alpha=catversion_alpha(m), class_word=class_word, seed=seed)
    items = [(lat, cap, trig) for lat, cap, trig in identity_items]
    res = train_catversion(world.den, {"text": world.text}, world.text.encode, items, spec, cfg)
    with installed(world.text, res.embeddings["text"]):
        imgs = {k: world.generate(ps[k], noise[k], c) for k in ps}
    return imgs, res
