"""CatVersion rows of `bench kps`: `catversion` (as published: diffusion loss only), `catversion+cat<alpha>`, and
`catversion:earlier[+cat<alpha>]` (this pack's earlier choices).

The world's text encoder has 2 self-attention layers, so "the last 3" of the paper become both of them;
one embedding per layer, N(0, 1) init, the paper's lr 1e-2 and batch 2 (not the LoRA rows' lr), the same
steps, seeds and images as the other methods.

As published (read in the authors' code, RoyZhao926/CatVersion): the training caption is the class prompt without
the trigger ("a circle on a grey background"), images are flipped with p 0.5, and the sampler's unconditional
branch is encoded *without* the embeddings (their txt2img loads a saved unconditional conditioning, models/uc.pt,
instead of encoding "" through the encoder with the adapter loaded; the line that would has been commented out). With
class captions the concept is asked for the way it was trained, by the class prompt with the embeddings loaded, so
the bench's "with trigger" images are drawn from the class prompts (same noise as the other rows' trigger images):
there is no separate trigger, and every tokenless circle is the concept too (leak = identity by construction).

`catversion:earlier`: captions with the trigger, no flips, the embeddings on every prompt including the
unconditional "" (what the earlier rows measured; it is *not* the authors' sampler).
"""
from __future__ import annotations

import math

from ..adapters.catversion import PAPER_LAYERS, CatVersionSpec, disabled, find_self_attention, installed
from ..training import CatVersionConfig, train_catversion

LR, BATCH = 1e-2, 2  # the paper's (5e-3 base rate x batch 2)


def _parts(m: str) -> tuple[bool, str]:
    head, plus, tail = m.partition("+")
    if head not in ("catversion",
                    "catversion:earlier") or (plus and not tail.startswith("cat")) or (plus and not tail[3:]):
        raise ValueError(f"unknown CatVersion method {m!r}; use catversion[:earlier] or "
                         "catversion[:earlier]+cat<alpha> (e.g. catversion+cat1)")
    return head.endswith(":earlier"), tail


def catversion_alpha(m: str) -> float:
    """'catversion' -> 0.0; 'catversion+cat1' -> 1.0; 'catversion:earlier+cat0.5' -> 0.5; anything else: ValueError."""
    _, tail = _parts(m)
    if not tail:
        return 0.0
    alpha = float(tail[3:])
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"CAT factor in {m!r} must be a number >= 0")
    return alpha


def catversion_label(m: str) -> str:
    a, earlier = catversion_alpha(m), _parts(m)[0]
    name = "CatVersion (earlier choices)" if earlier else "CatVersion"
    return name if a == 0 else f"{name} + CAT (α={a:g})"


def run_catversion(world, m: str, c, seed: int, ps: dict, noise: dict, identity_items: list[tuple], class_word: str):
    """Train on the identity images (the bench's (latent, caption, triggers) items and class word, passed in so
    this module does not import the bench back), then draw the bench's prompts with the embeddings installed:
    (images, result)."""
    earlier = _parts(m)[0]
    spec = CatVersionSpec(layers=min(PAPER_LAYERS, len(find_self_attention(world.text))))
    cfg = CatVersionConfig(steps=c.steps, lr=LR, batch_size=BATCH, alpha=catversion_alpha(m), class_word=class_word,
                           seed=seed, caption="trigger" if earlier else "class", flip=0.0 if earlier else 0.5)
    items = [(lat, cap, trig) for lat, cap, trig in identity_items]
    res = train_catversion(world.den, {"text": world.text}, world.text.encode, items, spec, cfg)
    with installed(world.text, res.embeddings["text"]) as switch:
        if earlier:
            imgs = {k: world.generate(ps[k], noise[k], c) for k in ps}
        else:
            with disabled(switch):
                uncond = world.encode_text([""])
            asked = {**ps, "token": ps["notoken"]}  # the concept is asked by the class prompt it was trained on
            imgs = {k: world.generate(asked[k], noise[k], c, uncond) for k in ps}
    return imgs, res
