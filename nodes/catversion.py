"""CatVersion in ComfyUI: train Key/Value embeddings on the graph's own CLIP, save them, apply them to a CLIP.

Files live in `models/catversion/` (registered as the folder_paths name "catversion" when the pack loads; extra
paths can be added in extra_model_paths.yaml under that name). Apply CatVersion returns a *clone* of the CLIP
whose self-attention `forward`s are replaced by object patches: ComfyUI sets them when that clone loads
and restores the originals when another clone of the same CLIP loads, so the input CLIP encodes exactly
as before. Training installs the embeddings on the shared modules only inside the trainer and removes
them on exit; the CLIP's and the UNet's tensors are checked bit for bit against checksums taken before.
"""
from __future__ import annotations

import os
import time

import torch
from comfy_api.latest import io

from ..cat_train.adapters import catversion as cv
from ..cat_train.training.catversion import CatVersionConfig, train_catversion, training_metadata
from ..cat_train.training.integrity import changed, module_fingerprint
from ..cat_train.options import help_of
from ..cat_train.measure.plot import loss_curve
from ..cat_train.training.precision import mixed_precision_name
from .comfy_clip import apply_catversion, clip_encoders, encoder_fn, infos, out_of_place_residuals, output_layer
from .comfy_model import leave_inference_mode, adm_y, trainable
from . import early_cancel
from .common import CATEGORY, CatVersion, Dataset, image_of, progress_callback
from .compat import search_aliases
from .lora_io import name_problem, safe_lora_path

FOLDER = "catversion"
_CFG, _SPEC = CatVersionConfig(), cv.CatVersionSpec()  # the widgets' defaults are the core's


def register_folder() -> str:
    """models/catversion as the folder_paths name 'catversion', through folder_paths' own API (after any paths
    extra_model_paths.yaml gave that name, so those stay first); returns its default path. The API sets no file
    extensions, so the files are filtered by `files()`."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, FOLDER)
    folder_paths.add_model_folder_path(FOLDER, default)
    return default


def files() -> list[str]:
    """The CatVersion files in models/catversion (and the yaml's paths): .safetensors only."""
    import folder_paths

    return [f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(".safetensors")]


def load_file(clip, name: str):
    """(embeddings, metadata) of models/catversion/<name>, checked against this CLIP (errors name the file)."""
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"CatVersion file {name!r} is not in {folder_paths.get_folder_paths(FOLDER)}; "
                         "save one with Save CatVersion or copy a .safetensors there.")
    return cv.load_catversion(path, expect=infos(clip))


class CatVersionWeights(dict):
    """What the trainer passes to Save CatVersion: {encoder name: KVEmbeddings} plus .metadata."""
    metadata: dict[str, str] = {}


def _finish(mp):
    """Batched encoder output -> the UNet's cond for these latents (SDXL: y from pooled output and size)."""
    def finish(c: dict, x0: torch.Tensor) -> dict:
        h, w = x0.shape[-2] * 8, x0.shape[-1] * 8
        adm = adm_y(mp, c.get("pooled"), w, h, c["context"].device)
        out = {"context": c["context"]}
        if adm is not None:
            out["y"] = adm.to(c["context"])
        return out
    return finish


@torch.inference_mode(False)
def train_on_clip(mp, clip, dataset, spec: cv.CatVersionSpec, cfg: CatVersionConfig, node_id: str | None = None,
                  compute: str = "auto", **loop):
    """(CLIP clone with the embeddings, CatVersionWeights, loss-curve IMAGE, summary). The input MODEL and CLIP are
    checked bit for bit afterwards; a difference is raised, never passed over. `loop`: further TrainConfig settings
    (checkpoint_dir, save_every, grad_accum, ...) and resume, as `train_catversion` takes them."""
    t0 = time.perf_counter()
    items = []
    with trainable(mp, compute) as den:
        for lat, cap, trig, rep in dataset.items:
            x0 = mp.model.process_latent_in(lat[None].clone())[0]
            items += [(x0, cap, tuple(trig))] * max(1, int(rep))
        clip.load_model()
        cs = clip.cond_stage_model
        leave_inference_mode(cs)  # inference tensors cannot be saved for backward
        before = module_fingerprint(cs)
        encs = clip_encoders(clip)
        loop.setdefault("mixed_precision", mixed_precision_name(den.compute_dtype))
        try:
            with torch.enable_grad(), out_of_place_residuals(encs):
                result = train_catversion(den, encs, encoder_fn(clip), items, spec, cfg,
                                          {n: output_layer(clip, e) for n, e in encs.items()},
                                          progress_callback(node_id, cfg.steps), _finish(mp), **loop)
        finally:
            cs.reset_clip_options()
            bad = changed(before, module_fingerprint(cs))
            if bad:
                raise RuntimeError(f"the CLIP changed during CatVersion training ({len(bad)} tensors, e.g. {bad[:2]}); "
                                   "please report this: the input CLIP must stay untouched.")
    weights = CatVersionWeights(result.embeddings)
    weights.metadata = training_metadata(spec, cfg, dataset.triggers, type(clip.cond_stage_model).__name__,
                                         len(dataset.items), len(result.history))
    applied = apply_catversion(clip, result.embeddings, "the trained embeddings")
    hist = result.history
    layers = ", ".join(f"{n}: layers {list(e.layer_indices)}" for n, e in result.embeddings.items())
    summary = (f"CatVersion: {len(hist)}/{cfg.steps} steps in {time.perf_counter() - t0:.1f}s, {cv.param_count(result.embeddings)} "
               f"parameters ({layers}; {spec.length} per layer), CAT factor {cfg.alpha}\n"
               f"loss first {hist[0]['loss']:.5f} last {hist[-1]['loss']:.5f}; fit {hist[-1]['fit']:.5f} keep {hist[-1]['keep']:.6f}")
    image = image_of(loss_curve(hist, keys=("loss", "fit", "keep") if cfg.alpha else ("loss",), title="CatVersion training loss"))
    return applied, weights, image, summary


# ---------------------------------------------------------------- nodes


class CatVersionTrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_CatVersionTrainer", display_name="CatVersion Trainer", category=CATEGORY,
            **search_aliases("train embedding", "textual inversion", "concept embedding"),
            description="CatVersion (arXiv 2311.14631): learns the concept as Key/Value embeddings concatenated in the last "
                        "self-attention layers of the CLIP text encoder; the UNet and CLIP weights stay frozen.",
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), Dataset.Input("dataset"),
                io.Int.Input("layers", default=3, min=1, max=64, tooltip=help_of(cv.CatVersionSpec, "layers")),
                io.Int.Input("embeddings_per_layer", default=1, min=1, max=64, tooltip=help_of(cv.CatVersionSpec, "length")),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip=help_of(CatVersionConfig, "steps")),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4, tooltip=help_of(CatVersionConfig, "lr")),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip=help_of(CatVersionConfig, "batch_size")),
                io.Float.Input("cat_factor", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip=help_of(CatVersionConfig, "alpha")),
                io.String.Input("class_word", default="", tooltip=help_of(CatVersionConfig, "class_word")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip=help_of(CatVersionConfig, "seed")),
                # appended (optional): graphs saved before them load with the defaults, the published form
                io.Combo.Input("caption", options=["class", "trigger"], default=_CFG.caption, optional=True,
                               tooltip=help_of(CatVersionConfig, "caption")),
                io.Float.Input("flip", default=_CFG.flip, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip=help_of(CatVersionConfig, "flip")),
                io.Float.Input("prefix_bias", default=_SPEC.prefix_bias, min=-10.0, max=10.0, step=0.5, optional=True,
                               tooltip=help_of(cv.CatVersionSpec, "prefix_bias")),
            ],
            outputs=[io.Clip.Output(display_name="CLIP"), CatVersion.Output(display_name="catversion"),
                     io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="summary")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, dataset, layers, embeddings_per_layer, steps, learning_rate, batch_size, cat_factor,
                class_word, seed, caption=None, flip=None, prefix_bias=None, **unknown) -> io.NodeOutput:
        early_cancel.check()  # a Cancel sent before this prompt started (ComfyUI drops it)
        if unknown:  # ComfyUI passes a link to an input the node does not have (an API graph, a pasted one)
            names = ", ".join(sorted(unknown))
            hint = (" CAT Training Options is for the CAT LoRA Trainer; CatVersion's settings are this node's own "
                    "widgets." if "options" in unknown else "")
            raise ValueError(f"CatVersion Trainer has no input {names}: remove that link.{hint}")
        caption = caption or _CFG.caption
        word = class_word.strip() or getattr(dataset, "class_word", "")
        if cat_factor > 0 and not word:
            raise ValueError("cat_factor > 0 needs a class word for y (caption with the trigger replaced); set class_word.")
        if caption == "class" and not word:
            raise ValueError("CatVersion Trainer > caption 'class' trains on the class word instead of the trigger (as "
                             "published), but neither class_word nor the dataset's class word is set: set class_word, "
                             "or caption 'trigger' to train on the captions as they are.")
        spec = cv.CatVersionSpec(layers=layers, length=embeddings_per_layer,
                                 prefix_bias=_SPEC.prefix_bias if prefix_bias is None else prefix_bias)
        cfg = CatVersionConfig(steps=steps, lr=learning_rate, batch_size=batch_size, alpha=cat_factor,
                               class_word=word, seed=seed, caption=caption, flip=_CFG.flip if flip is None else flip)
        applied, weights, image, summary = train_on_clip(model, clip, dataset, spec, cfg, cls.hidden.unique_id)
        return io.NodeOutput(applied, weights, image, summary, ui={"text": [summary]})


class SaveCatVersionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_SaveCatVersion", display_name="Save CatVersion", category=CATEGORY, is_output_node=True,
            **search_aliases("save embedding"),
            description="Writes the embeddings (.safetensors with metadata) into models/catversion; never overwrites.",
            inputs=[CatVersion.Input("catversion"), io.String.Input("name", default="catversion")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        import folder_paths

        return name_problem(folder_paths.get_folder_paths(FOLDER)[0], name, "CatVersion name", "models/catversion", "my_concept")

    @classmethod
    def execute(cls, catversion, name) -> io.NodeOutput:
        import folder_paths

        path = cv.save_catversion(safe_lora_path(folder_paths.get_folder_paths(FOLDER)[0], name), dict(catversion),
                                  getattr(catversion, "metadata", {}))
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


class ApplyCatVersionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_ApplyCatVersion", display_name="Apply CatVersion", category=CATEGORY,
            **search_aliases("load embedding", "catversion loader"),
            description="CLIP + a CatVersion file from models/catversion -> a CLIP that encodes every prompt with the "
                        "embeddings, for the positive prompt, and a CLIP for the negative prompt: without the embeddings "
                        "as the authors' sampler (their unconditional prompt), or with them (embeddings_on_negative). "
                        "The input CLIP is untouched; the UNet is not changed.",
            inputs=[io.Clip.Input("clip"),
                    io.Combo.Input("catversion_name", options=files() or ["(none in models/catversion)"]),
                    io.Boolean.Input("embeddings_on_negative", default=False, optional=True,
                                     tooltip="off (the authors' sampler): the second output is the input CLIP, so the "
                                             "negative prompt is encoded without the embeddings; on: the embeddings "
                                             "on it too (this pack's earlier behaviour).")],
            outputs=[io.Clip.Output(display_name="CLIP"), io.Clip.Output(display_name="CLIP for negative")],
        )

    @classmethod
    def execute(cls, clip, catversion_name, embeddings_on_negative=False) -> io.NodeOutput:
        embs, _ = load_file(clip, catversion_name)
        applied = apply_catversion(clip, embs, catversion_name)
        return io.NodeOutput(applied, applied if embeddings_on_negative else clip)


NODES = [CatVersionTrainerNode, SaveCatVersionNode, ApplyCatVersionNode]
