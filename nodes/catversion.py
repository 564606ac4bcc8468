"""CatVersion in ComfyUI: train Key/Value embeddings on the graph's own CLIP, save them, apply them to a CLIP.

Files live in `models/catversion/` (registered here as the folder_paths name "catversion"; extra paths
can be added in extra_model_paths.yaml under that name). Apply CatVersion returns a *clone* of the CLIP
whose self-attention `forward`s are replaced by object patches: ComfyUI sets them when that clone loads
and restores the originals when another clone of the same CLIP loads, so the input CLIP encodes exactly
as before. Training installs the embeddings on the shared modules only inside the trainer and removes
them on exit; the CLIP's and the UNet's tensors are checked bit for bit against checksums taken before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import torch
from comfy_api.latest import io

from ..cat_train import catversion as cv
from ..cat_train.integrity import changed, module_fingerprint

log = logging.getLogger("ComfyUI-CAT")
FOLDER = "catversion"
CATEGORY = "CAT (contrastive adapter training)"
CatVersionType = io.Custom("CATVERSION")


def register_folder() -> str:
    """models/catversion as the folder_paths name 'catversion' (.safetensors only); returns its default path."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")
    return default


register_folder()


# ---------------------------------------------------------------- CLIP internals


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
                         f"{sorted(encs)}: it was trained on another model family; use it with that CLIP or train again.")
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
                        "do nothing here (CLIP Set Last Layer / clip skip differs from training).", source, late, name, last)
        keys, values = emb.keys.detach(), emb.values.detach()
        for j, i in enumerate(emb.layer_indices):
            path, module = attn[i]
            n.patcher.add_object_patch(f"{name}.{path}.forward", cv.prefixed_forward(module, keys[j], values[j]))
    return n


def load_file(clip, name: str):
    """(embeddings, metadata) of models/catversion/<name>, checked against this CLIP (errors name the file)."""
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"CatVersion file {name!r} is not in {folder_paths.get_folder_paths(FOLDER)}; "
                         "save one with Save CatVersion or copy a .safetensors there.")
    return cv.load_catversion(path, expect=infos(clip))


# ---------------------------------------------------------------- training


class CatVersionWeights(dict):
    """What the trainer passes to Save CatVersion: {encoder name: KVEmbeddings} plus .metadata."""
    metadata: dict[str, str] = {}


def _finish(mp):
    """Batched encoder output -> the UNet's cond for these latents (SDXL: y from pooled output and size)."""
    def finish(c: dict, x0: torch.Tensor) -> dict:
        h, w = x0.shape[-2] * 8, x0.shape[-1] * 8
        adm = mp.model.encode_adm(pooled_output=c.get("pooled"), width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                                  target_height=h, device=c["context"].device, prompt_type="positive")
        out = {"context": c["context"]}
        if adm is not None:
            out["y"] = adm.to(c["context"])
        return out
    return finish


def _encoder_fn(clip):
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
                if all(hasattr(m, a) for a in ("layer_norm1", "self_attn", "layer_norm2", "mlp")) and "forward" not in m.__dict__:
                    def forward(x, mask=None, optimized_attention=None, m=m):
                        x = x + m.self_attn(m.layer_norm1(x), mask, optimized_attention)
                        return x + m.mlp(m.layer_norm2(x))
                    m.forward = forward
                    done.append(m)
        yield
    finally:
        for m in done:
            del m.forward


@torch.inference_mode(False)
def train_on_clip(mp, clip, dataset, spec: cv.CatVersionSpec, cfg: cv.CatVersionConfig, node_id: str | None = None,
                  compute: str = "auto", **loop):
    """(CLIP clone with the embeddings, CatVersionWeights, loss-curve IMAGE, summary). The input MODEL and CLIP are
    checked bit for bit afterwards; a difference is raised, never passed over. `loop`: further TrainConfig settings
    (checkpoint_dir, save_every, grad_accum, ...) and resume, as `cv.train_catversion` takes them."""
    from ..cat_train.plot import loss_curve
    from ..cat_train.precision import mixed_precision_name
    from .comfy_model import _leave_inference_mode, trainable
    from .trainer import progress_callback

    t0 = time.perf_counter()
    items = []
    with trainable(mp, compute) as den:
        for lat, cap, trig, rep in dataset.items:
            x0 = mp.model.process_latent_in(lat[None].clone())[0]
            items += [(x0, cap, tuple(trig))] * max(1, int(rep))
        clip.load_model()
        cs = clip.cond_stage_model
        _leave_inference_mode(cs)  # inference tensors cannot be saved for backward
        before = module_fingerprint(cs)
        encs = clip_encoders(clip)
        loop.setdefault("mixed_precision", mixed_precision_name(den.compute_dtype))
        try:
            with torch.enable_grad(), out_of_place_residuals(encs):
                result = cv.train_catversion(den, encs, _encoder_fn(clip), items, spec, cfg,
                                             {n: output_layer(clip, e) for n, e in encs.items()},
                                             progress_callback(node_id, cfg.steps), _finish(mp), **loop)
        finally:
            cs.reset_clip_options()
            bad = changed(before, module_fingerprint(cs))
            if bad:
                raise RuntimeError(f"the CLIP changed during CatVersion training ({len(bad)} tensors, e.g. {bad[:2]}); "
                                   "please report this: the input CLIP must stay untouched.")
    weights = CatVersionWeights(result.embeddings)
    weights.metadata = cv.training_metadata(spec, cfg, dataset.triggers, type(clip.cond_stage_model).__name__,
                                            len(dataset.items), len(result.history))
    applied = apply_catversion(clip, result.embeddings, "the trained embeddings")
    hist = result.history
    layers = ", ".join(f"{n}: layers {list(e.layer_indices)}" for n, e in result.embeddings.items())
    summary = (f"CatVersion: {len(hist)}/{cfg.steps} steps in {time.perf_counter() - t0:.1f}s, {cv.param_count(result.embeddings)} "
               f"parameters ({layers}; {spec.length} per layer), CAT factor {cfg.alpha}\n"
               f"loss first {hist[0]['loss']:.5f} last {hist[-1]['loss']:.5f}; fit {hist[-1]['fit']:.5f} keep {hist[-1]['keep']:.6f}")
    curve = loss_curve(hist, keys=("loss", "fit", "keep") if cfg.alpha else ("loss",), title="CatVersion training loss")
    image = torch.from_numpy(np.asarray(curve, dtype=np.float32) / 255.0)[None]
    return applied, weights, image, summary


# ---------------------------------------------------------------- nodes


class CatVersionTrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_CatVersionTrainer", display_name="CatVersion Trainer", category=CATEGORY,
            description="CatVersion (arXiv 2311.14631): learns the concept as Key/Value embeddings concatenated in the last "
                        "self-attention layers of the CLIP text encoder; the UNet and CLIP weights stay frozen.",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Custom("CAT_DATASET").Input("dataset"),
                io.Int.Input("layers", default=3, min=1, max=64, tooltip="the last N self-attention layers feeding the output (paper: 3)"),
                io.Int.Input("embeddings_per_layer", default=1, min=1, max=64, tooltip="paper: 1"),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="paper: 1000"),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4, tooltip="paper: 1e-2 (5e-3 x batch 2)"),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip="paper: 2"),
                io.Float.Input("cat_factor", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip="CAT term: 0 = CatVersion as published; > 0 keeps the class prompt's conditioning"),
                io.String.Input("class_word", default="", tooltip="for cat_factor > 0: y = caption with the trigger -> this word"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
            ],
            outputs=[io.Clip.Output(display_name="CLIP"), CatVersionType.Output(display_name="catversion"),
                     io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="summary")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, layers, embeddings_per_layer, steps, learning_rate, batch_size, cat_factor,
                class_word, seed) -> io.NodeOutput:
        word = class_word.strip() or getattr(dataset, "class_word", "")
        if cat_factor > 0 and not word:
            raise ValueError("cat_factor > 0 needs a class word for y (caption with the trigger replaced); set class_word.")
        spec = cv.CatVersionSpec(layers=layers, length=embeddings_per_layer)
        cfg = cv.CatVersionConfig(steps=steps, lr=learning_rate, batch_size=batch_size, alpha=cat_factor,
                                  class_word=word, seed=seed)
        applied, weights, image, summary = train_on_clip(model, clip, dataset, spec, cfg, cls.hidden.unique_id)
        return io.NodeOutput(applied, weights, image, summary, ui={"text": [summary]})


class SaveCatVersionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_SaveCatVersion", display_name="Save CatVersion", category=CATEGORY, is_output_node=True,
            description="Writes the embeddings (.safetensors with metadata) into models/catversion; never overwrites.",
            inputs=[CatVersionType.Input("catversion"), io.String.Input("name", default="catversion")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        import folder_paths

        from .lora_io import name_problem

        return name_problem(folder_paths.get_folder_paths(FOLDER)[0], name, "CatVersion name", "models/catversion", "my_concept")

    @classmethod
    def execute(cls, catversion, name) -> io.NodeOutput:
        import folder_paths

        from .lora_io import safe_lora_path

        path = cv.save_catversion(safe_lora_path(folder_paths.get_folder_paths(FOLDER)[0], name), dict(catversion),
                                  getattr(catversion, "metadata", {}))
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


class ApplyCatVersionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="CAT_ApplyCatVersion", display_name="Apply CatVersion", category=CATEGORY,
            description="CLIP + a CatVersion file from models/catversion -> a CLIP that encodes every prompt with the "
                        "embeddings (the input CLIP is untouched; the UNet is not changed).",
            inputs=[io.Clip.Input("clip"),
                    io.Combo.Input("catversion_name", options=folder_paths.get_filename_list(FOLDER) or ["(none in models/catversion)"])],
            outputs=[io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls, clip, catversion_name) -> io.NodeOutput:
        embs, _ = load_file(clip, catversion_name)
        return io.NodeOutput(apply_catversion(clip, embs, catversion_name))


NODES = [CatVersionTrainerNode, SaveCatVersionNode, ApplyCatVersionNode]
