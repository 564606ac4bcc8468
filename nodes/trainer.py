"""The CAT LoRA Trainer node, and its work outside the node class so tests can call it: CAT on a ModelPatcher.

Flow: dataset items -> Examples (captions encoded once, SDXL `y` built per latent size by the model's
encode_adm) -> cat_train.training.loop on the shared UNet (adapter injected, then removed: the UNet is left
bit-identical) -> kohya state dict -> a *clone* of the MODEL patched the stock way (add_patches via
comfy.sd.load_lora_for_models), so any sampler uses it and the input MODEL is untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import time
from pathlib import Path

import torch
from comfy_api.latest import io

from ..cat_train import families
from ..cat_train.adapters.lora import LoraSpec, lora_param_count, lora_saved_bytes
from ..cat_train.adapters.algorithms import ALGORITHMS
from ..cat_train.training.budget import DoesNotFit, MemoryBudget, adapter_bytes, probe_activations, tensor_bytes
from ..cat_train.training.checks import check_concepts, check_masks
from ..cat_train.step.cancel import cancel_check
from ..cat_train.adapters.export import to_kohya
from ..cat_train.training import CatLossConfig
from ..cat_train.options import help_of
from ..cat_train.measure.plot import loss_curve
from ..cat_train.training.precision import CHOICES as COMPUTE_CHOICES
from ..cat_train.training.precision import mixed_precision_name
from ..cat_train.training import Example, TrainConfig, TrainResult, build_examples, train
from ..cat_train.step.conds import common_length
from .comfy_model import COND_EXTRAS, adm_y, base_model_version, family_of, model_text, prompt_tokens, trainable
from . import early_cancel
from .common import (CATEGORY, STOPPED_EVENT, Dataset, LossConfig, TrainingOptions, feeds, image_of, model_file_name,
                     phase_progress, progress_callback, send_event)
from .compat import search_aliases
from .lora_io import CatLora, name_problem, safe_subpath
from .training_options import options_for
from .save_lora import check_lora_folder, loras_folder, metadata, step_lora_writer

log = logging.getLogger("ComfyUI-CAT")


class CatTrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_LoraTrainer", display_name="CAT LoRA Trainer", category=CATEGORY, not_idempotent=False,
            **search_aliases("train lora", "lora training", "dreambooth", "finetune", "contrastive adapter training"),
            description="Trains a CAT LoRA; returns a clone of MODEL with it applied (the input MODEL is untouched).",
            inputs=[
                io.Model.Input("model"), Dataset.Input("dataset"), LossConfig.Input("loss_config"),
                io.Int.Input("rank", default=16, min=1, max=256, tooltip=help_of(LoraSpec, "rank")),
                io.Float.Input("lora_alpha", default=16.0, min=0.01, max=1024.0, step=0.5,
                               tooltip=help_of(LoraSpec, "alpha")),
                io.Combo.Input("target", options=list(families.TARGETS), default="attn",
                               tooltip=help_of(LoraSpec, "preset")),
                io.Int.Input("steps", default=600, min=1, max=100000, tooltip=help_of(TrainConfig, "steps")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip=help_of(TrainConfig, "lr")),
                io.Combo.Input("lr_schedule", options=["constant", "cosine"], default="constant",
                               tooltip=help_of(TrainConfig, "lr_schedule")),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=help_of(TrainConfig, "batch_size")),
                io.Int.Input("grad_accum", default=1, min=1, max=64, tooltip=help_of(TrainConfig, "grad_accum")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip=help_of(TrainConfig, "seed")),
                io.Combo.Input("dtype", options=list(COMPUTE_CHOICES), default="auto",
                               tooltip="compute dtype of the training forward; base weights keep their stored dtype "
                                       "and LoRA weights are fp32. auto: bf16 on GPUs that have it, else fp16; on the "
                                       "CPU bf16 for a bf16 model, else fp32"),
                io.Combo.Input("gradient_checkpointing", options=["auto", "on", "off"], default="auto",
                               tooltip=help_of(TrainConfig, "gradient_checkpointing")),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip=help_of(TrainConfig, "save_every")),
                io.String.Input("checkpoint_name", default="cat_run", tooltip="folder under output/cat_checkpoints/"),
                io.String.Input("resume_from", default="", optional=True, tooltip=
                        "a cat-stepNNNNNN.pt checkpoint to continue: <checkpoint_name>/cat-stepNNNNNN.pt, a full path, "
                        "or the file name alone when one run folder holds it (a Cancel shows the path on the node)"),
                # new inputs only at the end, all optional: shipped workflows keep their widget order
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="draw preview images every N steps with the current LoRA (0 = off; needs vae): "
                                     "the same noise every round, shown on this node and returned as a grid"),
                io.Vae.Input("vae", optional=True, tooltip="decodes the preview images (the VAE CAT Dataset uses)"),
                io.String.Input("preview_prompts", default="", optional=True,
                                tooltip="preview prompts separated by |, blank: the first caption with and without the "
                                        "trigger and each preservation prompt"),
                io.Int.Input("validate_every", default=0, min=0, max=100000, optional=True,
                             tooltip="every N steps, fit and keep drift at fixed (noise, timestep) points, no sampling "
                                     "(0 = off): curves in the live view, a CSV under "
                                     "output/cat_checkpoints/<checkpoint_name>"),
                io.String.Input("probe_prompts", default="", optional=True,
                                tooltip="prompts without the trigger whose drift validation also measures, separated "
                                        "by | (e.g. a photo of a cat | a photo of a wolf)"),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="a CLIP vision model (Load CLIP Vision): IS and KPS of every saved step's "
                                            "previews (save_every, needs vae), and the best step picked from them"),
                TrainingOptions.Input("options", optional=True,
                                      tooltip="advanced options from a CAT Training Options node (unconnected: "
                                              "defaults)"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.LoraModel.Output(display_name="lora"),
                     io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="summary"),
                     io.Image.Output(display_name="previews"), io.Image.Output(display_name="step_chart"),
                     io.String.Output(display_name="best_step_lora")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None):
        return name_problem(checkpoints_folder(), checkpoint_name, "checkpoint_name", "output/cat_checkpoints",
                            "cat_run")

    @classmethod
    def execute(cls, model, dataset, loss_config, rank, lora_alpha, target, steps, learning_rate, lr_schedule,
                batch_size,
                grad_accum, seed, dtype, gradient_checkpointing, save_every, checkpoint_name, resume_from="",
                preview_every=0,
                vae=None, preview_prompts="", validate_every=0, probe_prompts="", clip_vision=None,
                options=None) -> io.NodeOutput:
        early_cancel.check()  # a Cancel sent before this prompt started (ComfyUI drops it)
        ckpt_dir = safe_subpath(checkpoints_folder(), checkpoint_name, "checkpoint_name", "output/cat_checkpoints",
                                "cat_run")
        loss_config = dataclasses.replace(loss_config, **options_for(options, CatLossConfig))  # a fresh copy either way
        check_concepts(dataset.triggers, loss_config)  # before any model work: weights of non-triggers, y = y_T
        check_masks(getattr(dataset, "mask_problems", []), loss_config)
        resume = resume_path(resume_from)
        cfg = TrainConfig(steps=steps, lr=learning_rate, lr_schedule=lr_schedule, batch_size=batch_size,
                          grad_accum=grad_accum,
                          seed=seed, save_every=save_every, checkpoint_dir=str(ckpt_dir),
                          **options_for(options, TrainConfig))
        spec = LoraSpec(rank=rank, alpha=lora_alpha, preset=target, **options_for(options, LoraSpec))
        before_any_work(dataset, loss_config, cfg, clip_vision, save_every, probe_prompts)
        base = model_file_name(cls.hidden.prompt, cls.hidden.unique_id)
        # step LoRAs (save_every) and a Save CAT LoRA fed by this node write to the loras folder: a read-only or full
        # one is found now, not at step N or after the whole run
        if save_every or feeds(cls.hidden.prompt, cls.hidden.unique_id, "CAT_SaveLora"):
            check_lora_folder(loras_folder(), 4 * lora_param_count(model.model.diffusion_model, spec),
                              "checkpoint_name" if save_every else "Save CAT LoRA's name")
        writer = (step_lora_writer(model, loras_folder(), checkpoint_name.strip(), loss_config, spec, cfg, dataset,
                                   base)
                  if save_every else None)
        watch = dict(vae=vae, preview_every=preview_every, prompts=preview_prompts, validate_every=validate_every,
                     probes=probe_prompts, clip_vision=clip_vision, out_dir=ckpt_dir)
        patched, lora, image, summary, result = train_on_model(model, dataset, loss_config, spec, cfg,
                                                               cls.hidden.unique_id, resume,
                                                               compute=dtype, checkpointing=gradient_checkpointing,
                                                               on_save=writer, base_model=base, watch=watch)
        m = result.measured
        return io.NodeOutput(patched, lora, image, summary, m.get("previews", nothing()),
                             m.get("step_chart", nothing()), m.get("best_file", ""), ui={"text": [summary]})


def nothing():
    """An IMAGE output with nothing to show (previews off, no saved steps): the nodes it feeds are skipped, silently.
    A grey 64 px picture in its place was saved by the shipped graphs' Save Image on every run with previews off."""
    from comfy_execution.graph_utils import ExecutionBlocker

    return ExecutionBlocker(None)
def before_any_work(dataset, loss_config: CatLossConfig, cfg: TrainConfig, clip_vision, save_every: int,
                    probe_prompts: str) -> None:
    """The checks that need the settings together, before the model is touched (the core makes them again at step 0,
    for scripts): refusals raise; warnings go to the log and, as a toast, to the browser that queued the run (they are
    in the summary again at the end)."""
    from ..cat_train.terms.mask import check_masks
    from ..cat_train.training.checks import check_prompts_without_trigger
    from ..cat_train.training.config import check_run
    from .watch import split_prompts

    if clip_vision is not None and not save_every:
        raise ValueError("clip_vision scores the previews of every saved step (IS, KPS, the best step), and save_every "
                         "is 0, so no step would be scored: set save_every (e.g. steps / 6), or disconnect "
                         "clip_vision.")
    if clip_vision is not None:
        from .evaluate import check_vision_model

        check_vision_model(clip_vision)
    check_prompts_without_trigger(dataset.triggers, split_prompts(probe_prompts), "probe_prompts entry")
    warnings = check_run(cfg, loss_config, len(dataset.items))
    if loss_config.mask.active:
        warnings += check_masks(getattr(dataset, "masks", None) or [], loss_config.mask_floor)
    if warnings:
        warn_user("Training settings", warnings)


def warn_user(title: str, warnings: list[str]) -> None:
    """A warning for the person running the graph: the log, and web/cat_warnings.js's toast in their browser."""
    from .lora_family_warning import EVENT

    for w in warnings:
        log.warning("ComfyUI-CAT: %s", w)
    try:  # the client whose prompt runs; in-process tests have no PromptServer
        from server import PromptServer
        inst = getattr(PromptServer, "instance", None)
    except Exception:
        inst = None
    if inst is not None:
        try:  # the queue CLI files a warning under the run whose prompt id it carries
            from comfy_execution.utils import get_executing_context
            ctx = get_executing_context()
            pid = ctx.prompt_id if ctx is not None else None
        except ImportError:
            pid = None
        inst.send_sync(EVENT, {"title": title, "warnings": list(warnings), **({"prompt_id": pid} if pid else {})},
                       getattr(inst, "client_id", None))



def checkpoints_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "cat_checkpoints"


def resume_path(resume_from: str | None) -> str:
    """The checkpoint file resume_from names (relative: under output/cat_checkpoints; a file name alone: the one run
    folder there that holds it), or '' for a fresh run."""
    resume = resume_from.strip() if resume_from else ""
    if resume and not os.path.isabs(resume):
        root = checkpoints_folder()
        resume = str(root / resume)
        if not os.path.isfile(resume) and "/" not in resume_from.strip() and "\\" not in resume_from.strip():
            found = sorted(root.glob(f"*/{glob.escape(resume_from.strip())}"))
            if len(found) == 1:
                return str(found[0])
            if found:
                shown = ", ".join(resume_text(f) for f in found[:6]) + (" ..." if len(found) > 6 else "")
                raise ValueError(f"resume_from {resume_from.strip()!r} is in {len(found)} run folders ({shown}); give "
                                 "the folder too, e.g. resume_from " + resume_text(found[0]) + ".")
    if resume and not os.path.isfile(resume):
        raise ValueError(f"resume checkpoint {resume} does not exist; give a cat-stepNNNNNN.pt file (full path or "
                         f"relative to {checkpoints_folder()}).")
    return resume


def resume_text(path) -> str:
    """What to type into resume_from for a checkpoint: its path under output/cat_checkpoints, else the full path."""
    try:
        return Path(path).resolve().relative_to(checkpoints_folder().resolve()).as_posix()
    except ValueError:
        return str(path)


def model_examples(mp, dataset, loss_cfg: CatLossConfig, tick=None, cfg: TrainConfig | None = None) -> list[Example]:
    """Examples in the UNet's own latent space (process_latent_in), with SDXL's y per latent size.

    Latents and conditionings (auto preservation's probes too) are converted once each and shared between examples:
    10,000 preservation prompts x 3 images cloned a conditioning per pair (+1.4 GB with a tiny CLIP, 12-32x that with
    a real one). tick() per prompt encoded and per example converted moves the bar and stops at Cancel. cfg: its caption
    options add caption rows (cat_train/data/captions.py), converted like the rest."""
    positions = dataset.token_positions if loss_cfg.apt.align_skip_triggers else None  # tokenizes only when asked
    # masks only where they weigh something: off, the examples (and the run's data fingerprint) are as without them
    masks = (getattr(dataset, "masks", None) if loss_cfg.mask.active else None) or [None] * len(dataset.items)
    frame = single_frame(mp)
    items = [(frame(lat), cap, trig, rep, m) for (lat, cap, trig, rep), m in zip(dataset.items, masks)]
    examples = build_examples(items,
                              dataset.encode_text, loss_cfg,
                              progress=(lambda done, total: tick()) if tick else None, token_positions=positions,
                              cfg=cfg, rank_text=getattr(dataset, "rank_text", None))
    latents, conds, probes, out = {}, {}, {}, []

    def unet_cond(c, w, h):
        key = (id(c), w, h)
        if key not in conds:
            conds[key] = (c, _unet_cond(mp, c, w, h))  # the source kept alive with it: ids stay unique
        return conds[key][1]
    for ex in examples:
        h, w = ex.latent.shape[-2] * 8, ex.latent.shape[-1] * 8
        if id(ex.latent) not in latents:
            latents[id(ex.latent)] = (ex.latent, frame.model_space(ex.latent))
        # auto preservation's probes: one dict per image, as build_examples made them
        if (id(ex.probes), w, h) not in probes:
            probes[(id(ex.probes), w, h)] = {p: unet_cond(c, w, h) for p, c in ex.probes.items()}
        out.append(dataclasses.replace(ex, latent=latents[id(ex.latent)][1], cond_token=unet_cond(ex.cond_token, w, h),
                                       cond_pres=unet_cond(ex.cond_pres, w, h), probes=probes[(id(ex.probes), w, h)]))
        if tick:
            tick()
    _same_extras_shape(out)
    return out


def _same_extras_shape(examples: list[Example]) -> None:
    """CONDITIONING extras (`COND_EXTRAS`: HiDream's Llama states) batch only at one length, as in ComfyUI: a caption
    longer than the encoder's padded length (HiDream: 128 Llama tokens, about 100 words) is refused by name."""
    for key in COND_EXTRAS.values():
        shapes = {tuple(c[key].shape) for e in examples for c in (e.cond_token, e.cond_pres) if key in c}
        if len(shapes) > 1:
            raise ValueError(f"the captions' {key} have different lengths {sorted(s[-2] for s in shapes)}: a caption "
                             "is longer than its text encoder pads to (HiDream: 128 Llama tokens, about 100 words); "
                             "shorten the longest captions.")


def single_frame(mp):
    """latent -> the trainer's (C, H, W) latent, with `.model_space(latent)` (process_latent_in). A video family's
    (Wan) VAE encodes an image as a one-frame clip (C, 1, H, W), which trains as that frame; its latent format
    normalises (B, C, T, H, W), so the frame goes through it as a clip. Clips of several frames are refused."""
    from .comfy_model import family_of

    video = getattr(family_of(mp), "video", False)

    def frame(latent: torch.Tensor) -> torch.Tensor:
        if not video or latent.ndim == 3:
            return latent
        if latent.ndim != 4 or latent.shape[1] != 1:
            raise ValueError(f"a dataset latent of shape {tuple(latent.shape)} for a {family_of(mp).title} model: CAT "
                             "trains it on images (one-frame clips); multi-frame clips are not supported.")
        return latent[:, 0]
    frame.model_space = (lambda z: mp.model.process_latent_in(z[None, :, None].clone())[0, :, 0]) if video else \
        (lambda z: mp.model.process_latent_in(z[None].clone())[0])
    return frame


def preparation_steps(dataset, loss_cfg: CatLossConfig, cfg: TrainConfig | None = None) -> int:
    """Ticks model_examples makes: prompts to encode (an upper bound) plus examples to convert."""
    n = len(dataset.items)
    pres = len(loss_cfg.preservation_prompts) or 1
    rows = ((cfg.caption_variants if cfg is not None and cfg.shuffle_tags else 0)
            + (1 if cfg is not None and cfg.caption_dropout else 0))
    return 2 * n + len(loss_cfg.preservation_prompts) + n * pres + rows * (2 * n * pres + n * pres) + (1 if rows else 0)


def _unet_cond(mp, c: dict, width: int, height: int) -> dict:
    # clone: an ordinary tensor even if CLIP ran under inference_mode
    cond = {"context": model_text(mp, c["context"][None])[0].clone()}
    adm = adm_y(mp, c["pooled"][None] if "pooled" in c else None, width, height, torch.device("cpu"))
    if adm is not None:
        cond["y"] = adm[0].detach().float().clone()
    cond.update({k: c[k].clone() for k in COND_EXTRAS.values() if k in c})
    cond.update(prompt_tokens(mp, cond["context"]))
    if family_of(mp).padded_text:  # batched by zero-padding: the mask says which tokens are text
        cond["attention_mask"] = torch.ones(cond["context"].shape[0])
    return cond


def memory_budget(den, examples: list[Example], spec: LoraSpec, loss_cfg: CatLossConfig,
                  cfg: TrainConfig) -> MemoryBudget:
    """Weights, LoRA + AdamW, and activations probed by one no-grad forward of the largest example."""
    import comfy.model_management as mm

    module, device = den.module, den.device
    ex = max(examples, key=lambda e: e.latent.numel())
    cond = {k: v[None].to(device) for k, v in ex.cond_token.items()}
    t = torch.tensor([den.schedule.num_timesteps // 2], device=device)
    amp = torch.autocast(device.type,
                         dtype=den.compute_dtype) if den.compute_dtype != torch.float32 else contextlib.nullcontext()

    def forward():
        with amp:
            den.predict(ex.latent[None].to(device), t, cond)

    try:
        probe = probe_activations(module, forward, den.family.checkpoint_units(module))
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise DoesNotFit(f"out of memory in one no-grad forward at batch 1 ({tuple(ex.latent.shape)} latent) on "
                         f"{device}, before training: lower the resolution, or free the GPU of other programs.") from e
    batch = cfg.batch_size * (2 if loss_cfg.alpha > 0 else 1)  # CAT: y_T and y rows in one adapted pass
    free = mm.get_free_memory(device)
    # LoHa/LoKr: + their deltas
    adapter = adapter_bytes(lora_param_count(module, spec)) + lora_saved_bytes(module, spec)
    return MemoryBudget(weights=tensor_bytes(module.parameters()), adapter=adapter,
                        activations_plain=probe.plain * batch, activations_checkpointed=probe.checkpointed * batch,
                        free=int(free) if free else None, device=str(device))


@dataclasses.dataclass
class TrainedOnModel(TrainResult):
    """The core's TrainResult and what the node's watch measured: preview grid, per-step chart, best step's file."""
    measured: dict = dataclasses.field(default_factory=dict)


@torch.inference_mode(False)
def train_on_model(mp, dataset, loss_cfg: CatLossConfig, spec: LoraSpec, cfg: TrainConfig, node_id: str | None = None,
                   resume: str | None = None, compute: str = "auto", checkpointing: str | None = None,
                   on_save=None, base_model: str = "", watch: dict | None = None):
    """Returns (patched clone, CatLora, loss-curve IMAGE, summary, TrainedOnModel).

    compute: the forward's dtype (cat_train.training.precision); checkpointing: auto/on/off (None: cfg's bool);
    on_save(step, weights): called with the LoRA at every `save_every` checkpoint; base_model: the checkpoint file
    the MODEL came from, for the LoRA header; watch: NodeWatch's options (previews, validation, per-step scores),
    whose results land in the result's `measured` (a `TrainedOnModel`)."""
    import comfy.sd

    t0 = time.perf_counter()
    prep = phase_progress(preparation_steps(dataset, loss_cfg, cfg))  # Cancel during preparation: within one item
    prep.check()
    # Cancel inside a step's long work (a preview round, an auto-preservation measurement): within a sampling step or
    # a measurement pass, not at the next step's callback
    with cancel_check(prep.check), trainable(mp, compute) as den:  # raises if the UNet did not come back bit-identical
        examples = model_examples(mp, dataset, loss_cfg, prep, cfg)
        masked = sum(m is not None for m in getattr(dataset, "masks", []))
        if masked and not loss_cfg.mask.active:
            log.info("ComfyUI-CAT: %d training images have masks; they weigh nothing while mask_floor is 1 and "
                     "mask_keep 0 (CAT Training Options: e.g. mask_floor 0.1 to train on them).", masked)
        prep.check()
        budget = memory_budget(den, examples, spec, loss_cfg, cfg)
        prep.check()  # after the probe forward, before step 1 and its checkpoint
        if checkpointing is None:
            checkpointing = "on" if cfg.gradient_checkpointing else "off"
        ckpt_on = budget.choose_checkpointing(checkpointing)
        log.info("ComfyUI-CAT %s", budget.report(ckpt_on))
        big = max(examples, key=lambda e: e.latent[0].numel()).latent
        budget.check(ckpt_on, cfg.batch_size, (big.shape[-1] * 8, big.shape[-2] * 8), spec.rank)
        # den.patcher: the patcher trained (a DynamicVRAM MODEL's non-dynamic copy), which previews load back after a
        # decode
        w = make_watch(den.patcher, den, dataset, examples, loss_cfg, cfg.seed, node_id, **(watch or {}))
        cb = progress_callback(node_id, cfg.steps, preview=w.image if w else None)
        cfg = dataclasses.replace(cfg, mixed_precision=mixed_precision_name(den.compute_dtype),
                                  gradient_checkpointing=ckpt_on)
        files: dict[int, object] = {}

        def saved(step, weights):
            files[step] = on_save(step, weights) if on_save else None
            if w:
                w.on_save(step, weights)

        def callback(info):
            if w:
                w.callback(info)
            cb(info)
        if w:
            w.step_file = files.get
            w.start()
        try:
            result = train(den, examples, loss_cfg, spec, cfg, callback=callback, resume=resume or None,
                           on_save=saved if (on_save or w) else None,
                           on_own_folder=own_folder_for(on_save, w),
                           own_folder=True)  # two queued runs with one checkpoint_name: the second gets its own folder
        except BaseException as e:  # Cancel or a crash: the canvas says where to resume from
            if getattr(e, "cat_checkpoint", None) is not None:
                send_event(STOPPED_EVENT, {"node": node_id, "checkpoint": str(e.cat_checkpoint),
                                           "resume_from": resume_text(e.cat_checkpoint)})
            raise
        finally:
            if w:
                w.close()
    sd = CatLora(to_kohya(result.weights, den.family.kohya_names(mp.model.diffusion_model)))
    sd.metadata = metadata(loss_cfg, spec, cfg, dataset, result.steps_done, result.history, base_model_version(mp),
                           base_model)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, dict(sd), 1.0, 0)
    hist = result.history
    summary = (f"CAT {ALGORITHMS[spec.algorithm].title}: {result.steps_done}/{cfg.steps} steps in "
               f"{time.perf_counter() - t0:.1f}s, {len(result.weights)} modules, rank {spec.rank}, LoRA alpha "
               f"{spec.alpha}, CAT factor {loss_cfg.alpha}\nloss first {hist[0]['loss']:.5f} last "
               f"{hist[-1]['loss']:.5f}; fit {hist[-1]['fit']:.5f} keep {hist[-1]['keep']:.6f}\n{len(dataset.items)} "
               f"images, buckets {dataset.buckets}"
               + (f"\ncheckpoint {result.last_checkpoint}" if result.last_checkpoint else "")
               + "".join(f"\nwarning: {w}" for w in result.warnings))
    image = image_of(loss_curve(hist, keys=("loss", "fit", "keep") if loss_cfg.alpha else ("loss",), title=
            "CAT training loss"))
    result = TrainedOnModel(**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
                            measured=measured(w) if w else {})
    if result.measured.get("text"):
        summary += "\n" + result.measured["text"]
    return patched, sd, image, summary, result


def own_folder_for(on_save, watch):
    """What follows a run moved to its own folder before step 1: its step LoRAs' names and its watch's files."""
    def moved(folder):
        if getattr(on_save, "run_folder", None):
            on_save.run_folder(folder)
        if watch:
            watch.move_to(folder)
    return moved


def make_watch(mp, den, dataset, examples, loss_cfg, seed, node_id, vae=None, preview_every=0, prompts="",
               validate_every=0,
               probes="", clip_vision=None, out_dir=None):
    """A NodeWatch when anything is to be watched (previews, validation, per-step scores), else None."""
    from .watch import NodeWatch

    if not (preview_every or validate_every or clip_vision is not None):
        return None
    try:
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
        prompt_id = ctx.prompt_id if ctx is not None else None
    except ImportError:
        prompt_id = None
    big = examples[0].latent
    return NodeWatch(den, mp, dataset, examples, Path(out_dir) if out_dir else checkpoints_folder() / "run", node_id,
                     prompt_id,
                     seed, vae=vae, preview_every=preview_every, prompts=prompts, validate_every=validate_every,
                     probes=probes, clip_vision=clip_vision, preservation_prompts=loss_cfg.preservation_prompts,
                     encode=unet_text_encoder(mp, dataset, big.shape[-1] * 8, big.shape[-2] * 8))


def unet_text_encoder(mp, dataset, width: int, height: int):
    """prompts -> batched UNet conditioning (context, and SDXL's y for this size), through the dataset's CLIP."""
    def encode(prompts: list[str]) -> dict:
        raw = [dataset.encode_text([p]) for p in prompts]  # one by one: each family batches its own way below
        rows = common_length([_unet_cond(mp, {k: v[0] for k, v in r.items()}, width, height) for r in raw], 0)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return encode


def measured(w) -> dict:
    """What the watch saw, for the node's outputs and summary: the preview grid, the per-step table and chart (saved to
    the run's folder under output/), the best step and its LoRA file."""
    from PIL import Image

    from .watch import step_chart

    out = {"text": w.summary()}
    grid = w.grid_tensor()
    if grid is not None:
        out["previews"] = grid
    table = w.write_table()
    chart = step_chart(w.table())
    if chart is not None:
        out["step_chart"] = chart
        Image.fromarray((chart[0].numpy() * 255).round().astype("uint8")).save(w.out_dir / "steps.png")
    if table is not None:
        out["text"] += f"\nper-step table {table}"
    best, why = w.best()
    if best is None:
        out["text"] += f"\nbest step: none picked ({why})" if w.table() else ""
    else:
        f = w.rows[best.step].get("file", "")
        out["best_file"] = f
        out["text"] += f"\nbest step {best.step}: {f or '(no step file)'} - {best.reason}"
    return out


NODES = [CatTrainerNode]
