"""ComfyUI's CLIP seen by CatVersion: its text encoders, the layer it outputs, a clone that encodes with
embeddings (object patches), a differentiable encode, and the out-of-place residuals autograd needs."""
from __future__ import annotations

import contextlib
import logging

import torch

from ..cat_train.adapters import catversion as cv

log = logging.getLogger("ComfyUI-CAT")


def clip_encoders(clip) -> dict[str, torch.nn.Module]:
    """The text encoders inside a CLIP's cond_stage_model by attribute name (SD1: clip_l; SDXL: clip_l, clip_g)."""
    out = {}
    for name, child in clip.cond_stage_model.named_children():
        try:
            cv.find_self_attention(child)
        except ValueError:
            continue
        out[name] = child
    if not out:
        raise ValueError(f"this CLIP ({type(clip.cond_stage_model).__name__}) has no text encoder with self-attention "
                         "layers CatVersion can reach.")
    return out


def output_layer(clip, encoder) -> int | None:
    """Index of the layer whose output becomes the conditioning (None: the last), honouring CLIP Set Last Layer."""
    if getattr(clip, "layer_idx", None) is not None:
        return clip.layer_idx
    layer = getattr(encoder, "layer", "last")
    if layer == "penultimate":
        return -2
    if layer == "hidden":
        return getattr(encoder, "layer_idx", None)
    return None


def infos(clip) -> dict[str, dict]:
    return {n: cv.encoder_info(e) for n, e in clip_encoders(clip).items()}


def apply_catversion(clip, embeddings: dict[str, cv.KVEmbeddings], source: str = "the embeddings"):
    """A clone of `clip` that encodes with the embeddings; the input CLIP is left as it was."""
    encs = clip_encoders(clip)
    missing = sorted(set(embeddings) - set(encs))
    if missing:
        raise ValueError(f"{source} holds embeddings for text encoder(s) {sorted(embeddings)}, but this CLIP has "
                         f"{sorted(encs)}: it was trained on another model family; use it with that CLIP or train "
                         "again.")
    n = clip.clone()
    for name, emb in embeddings.items():
        enc = encs[name]
        cv.check_compatible(emb.info(), cv.encoder_info(enc), source, name)
        attn = cv.find_self_attention(enc)
        out = output_layer(clip, enc)
        last = len(attn) - 1 if out is None else out % len(attn)
        late = [i for i in emb.layer_indices if i > last]
        if late:
            log.warning("ComfyUI-CAT: %s changes layers %s of %s, after the layer this CLIP outputs (%d): those layers "
                        "do nothing here (CLIP Set Last Layer / clip skip differs from training).", source, late, name,
                        last)
        keys, values = emb.keys.detach(), emb.values.detach()
        for j, i in enumerate(emb.layer_indices):
            path, module = attn[i]
            n.patcher.add_object_patch(f"{name}.{path}.forward",
                                       cv.prefixed_forward(module, keys[j], values[j],
                                                           bias=getattr(emb, "prefix_bias", 0.0)))
    return n


def encoder_fn(clip):
    """prompts -> {"context", "pooled"} through the CLIP as loaded, with gradients (ComfyUI's encode path minus its
    no-grad caching: the embeddings change every step)."""
    cs = clip.cond_stage_model

    def encode(prompts: list[str]) -> dict:
        rows = []
        for p in prompts:
            cs.reset_clip_options()
            if clip.layer_idx is not None:
                cs.set_clip_options({"layer": clip.layer_idx})
            o = cs.encode_token_weights(clip.tokenize(p))
            rows.append((o[0].float(), None if o[1] is None else o[1].float()))
        out = {"context": torch.cat([r[0] for r in rows])}
        if rows[0][1] is not None:
            out["pooled"] = torch.cat([r[1] for r in rows])
        return out
    return encode


@contextlib.contextmanager
def out_of_place_residuals(encoders: dict[str, torch.nn.Module]):
    """ComfyUI's CLIPLayer adds its residuals in place (`x += attn(norm(x))`), which autograd refuses once the
    layer norm saved x for backward. While training, each such layer gets an out-of-place forward (same
    arithmetic, same values); the instance attribute is deleted afterwards."""
    done = []
    try:
        for enc in encoders.values():
            for m in enc.modules():
                if all(hasattr(m, a) for a in ("layer_norm1", "self_attn", "layer_norm2",
                                               "mlp")) and "forward" not in m.__dict__:
                    def forward(x, mask=None, optimized_attention=None, m=m):
                        x = x + m.self_attn(m.layer_norm1(x), mask, optimized_attention)
                        return x + m.mlp(m.layer_norm2(x))
                    m.forward = forward
                    done.append(m)
        yield
    finally:
        for m in done:
            del m.forward
