"""The trainer node's work, outside the node class so tests can call it: CAT on a ModelPatcher.

Flow: dataset items -> Examples (captions encoded once, SDXL `y` built per latent size by the model's
encode_adm) -> cat_train.train on the shared UNet (adapter injected, then removed: the UNet is left
bit-identical) -> kohya state dict -> a *clone* of the MODEL patched the stock way (add_patches via
comfy.sd.load_lora_for_models), so any sampler uses it and the input MODEL is untouched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time

import numpy as np
import torch

from ..cat_train.adapter import LoraSpec, lora_param_count
from ..cat_train.budget import DoesNotFit, MemoryBudget, adapter_bytes, probe_activations, tensor_bytes
from ..cat_train.export import kohya_module_names, to_kohya, training_metadata
from ..cat_train.loss import CatLossConfig
from ..cat_train.plot import loss_curve
from ..cat_train.precision import mixed_precision_name
from ..cat_train.regularizers import metadata as regularizer_metadata
from ..cat_train.train import Example, StepInfo, TrainConfig, build_examples, train
from .comfy_model import checkpoint_units, trainable
from .lora_io import CatLora

log = logging.getLogger("ComfyUI-CAT")
EVENT = "cat.train.progress"


def _send(event: str, data: dict) -> None:
    try:  # `server` is importable only under a running ComfyUI; in-process tests have no PromptServer
        from server import PromptServer
        inst = getattr(PromptServer, "instance", None)
    except Exception:
        inst = None
    if inst is not None:
        inst.send_sync(event, data)


def progress_callback(node_id: str | None, total: int):
    import comfy.model_management as mm
    import comfy.utils

    pbar = comfy.utils.ProgressBar(total)
    try:  # events carry their prompt, so two runs on one server (or a queue client) can tell theirs apart
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
        prompt_id = ctx.prompt_id if ctx is not None else None
    except ImportError:
        prompt_id = None

    def cb(info: StepInfo) -> None:
        _send(EVENT, {"node": node_id, "prompt_id": prompt_id, "step": info.step, "total": info.total, "loss": info.loss, "fit": info.fit,
                      "keep": info.keep, "lr": info.lr, "elapsed": info.elapsed,
                      **info.reports})  # each regularizer's report under its name (APT: per-bin indicator for the live view)
        pbar.update_absolute(info.step, info.total)  # under a server this hook raises when Cancel is pressed
        mm.throw_exception_if_processing_interrupted()  # ...and this catches Cancel when no hook is set
    return cb


def model_examples(mp, dataset, loss_cfg: CatLossConfig) -> list[Example]:
    """Examples in the UNet's own latent space (process_latent_in), with SDXL's y per latent size."""
    examples = build_examples([(lat, cap, trig, rep) for lat, cap, trig, rep in dataset.items], dataset.encode_text, loss_cfg)
    out = []
    for ex in examples:
        h, w = ex.latent.shape[-2] * 8, ex.latent.shape[-1] * 8
        x0 = mp.model.process_latent_in(ex.latent[None].clone())[0]
        conds = [_unet_cond(mp, c, w, h) for c in (ex.cond_token, ex.cond_pres)]
        out.append(Example(x0, conds[0], conds[1], ex.weight, ex.repeats))
    return out


def _unet_cond(mp, c: dict, width: int, height: int) -> dict:
    cond = {"context": c["context"].clone()}  # an ordinary tensor even if CLIP ran under inference_mode
    adm = mp.model.encode_adm(pooled_output=c["pooled"][None] if "pooled" in c else None, width=width, height=height,
                              crop_w=0, crop_h=0, target_width=width, target_height=height,
                              device=torch.device("cpu"), prompt_type="positive")
    if adm is not None:
        cond["y"] = adm[0].detach().float().clone()
    return cond


def memory_budget(den, examples: list[Example], spec: LoraSpec, loss_cfg: CatLossConfig, cfg: TrainConfig) -> MemoryBudget:
    """Weights, LoRA + AdamW, and activations probed by one no-grad forward of the largest example."""
    import comfy.model_management as mm

    module, device = den.module, den.device
    ex = max(examples, key=lambda e: e.latent.numel())
    cond = {k: v[None].to(device) for k, v in ex.cond_token.items()}
    t = torch.tensor([den.schedule.num_timesteps // 2], device=device)
    amp = torch.autocast(device.type, dtype=den.compute_dtype) if den.compute_dtype != torch.float32 else contextlib.nullcontext()

    def forward():
        with amp:
            den.predict(ex.latent[None].to(device), t, cond)

    try:
        probe = probe_activations(module, forward, checkpoint_units(module))
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise DoesNotFit(f"out of memory in one no-grad forward at batch 1 ({tuple(ex.latent.shape)} latent) on {device}, "
                         "before training: lower the resolution, or free the GPU of other programs.") from e
    batch = cfg.batch_size * (2 if loss_cfg.alpha > 0 else 1)  # CAT: y_T and y rows in one adapted pass
    free = mm.get_free_memory(device)
    return MemoryBudget(weights=tensor_bytes(module.parameters()), adapter=adapter_bytes(lora_param_count(module, spec)),
                        activations_plain=probe.plain * batch, activations_checkpointed=probe.checkpointed * batch,
                        free=int(free) if free else None, device=str(device))


def run_name(model_id: str, settings: dict) -> str:
    return "cat-" + hashlib.sha1(repr(sorted(settings.items())).encode() + model_id.encode()).hexdigest()[:10]


@torch.inference_mode(False)
def train_on_model(mp, dataset, loss_cfg: CatLossConfig, spec: LoraSpec, cfg: TrainConfig, node_id: str | None = None,
                   resume: str | None = None, compute: str = "auto", checkpointing: str | None = None,
                   on_save=None):
    """Returns (patched clone, CatLora, loss-curve IMAGE, summary, TrainResult).

    compute: the forward's dtype (cat_train.precision); checkpointing: auto/on/off (None: cfg's bool);
    on_save(step, weights): called with the LoRA at every `save_every` checkpoint."""
    import comfy.sd

    t0 = time.perf_counter()
    with trainable(mp, compute) as den:  # raises if the shared UNet did not come back bit-identical
        examples = model_examples(mp, dataset, loss_cfg)
        budget = memory_budget(den, examples, spec, loss_cfg, cfg)
        if checkpointing is None:
            checkpointing = "on" if cfg.gradient_checkpointing else "off"
        ckpt_on = budget.choose_checkpointing(checkpointing)
        log.info("ComfyUI-CAT %s", budget.report(ckpt_on))
        big = max(examples, key=lambda e: e.latent[0].numel()).latent
        budget.check(ckpt_on, cfg.batch_size, (big.shape[-1] * 8, big.shape[-2] * 8), spec.rank)
        cb = progress_callback(node_id, cfg.steps)
        cfg = dataclasses.replace(cfg, mixed_precision=mixed_precision_name(den.compute_dtype), gradient_checkpointing=ckpt_on)
        result = train(den, examples, loss_cfg, spec, cfg, callback=cb, resume=resume or None, on_save=on_save)
    sd = CatLora(to_kohya(result.weights, kohya_module_names(mp.model.diffusion_model)))
    sd.metadata = metadata(loss_cfg, spec, cfg, dataset, result.steps_done, result.history, base_model_version(mp))
    patched, _ = comfy.sd.load_lora_for_models(mp, None, dict(sd), 1.0, 0)
    hist = result.history
    summary = (f"CAT LoRA: {result.steps_done}/{cfg.steps} steps in {time.perf_counter() - t0:.1f}s, "
               f"{len(result.weights)} modules, rank {spec.rank}, alpha {spec.alpha}, CAT factor {loss_cfg.alpha}\n"
               f"loss first {hist[0]['loss']:.5f} last {hist[-1]['loss']:.5f}; fit {hist[-1]['fit']:.5f} keep {hist[-1]['keep']:.6f}\n"
               f"{len(dataset.items)} images, buckets {dataset.buckets}"
               + (f"\ncheckpoint {result.last_checkpoint}" if result.last_checkpoint else ""))
    curve = loss_curve(hist, keys=("loss", "fit", "keep") if loss_cfg.alpha else ("loss",), title="CAT training loss")
    image = torch.from_numpy(np.asarray(curve, dtype=np.float32) / 255.0)[None]
    return patched, sd, image, summary, result


_KOHYA_VERSION = {"SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2",
                  "SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SSD1B": "sdxl_base_v1-0",
                  "SD3": "sd3", "Flux": "flux1"}  # kohya's sd-scripts writes "sd3" and "flux1" for these


def base_model_version(mp) -> str:
    """kohya's ss_base_model_version for the loaded family (its config class name when kohya has none)."""
    cfg = getattr(mp.model, "model_config", None)
    for cls in type(cfg).__mro__ if cfg is not None else ():
        if cls.__name__ in _KOHYA_VERSION:
            return _KOHYA_VERSION[cls.__name__]
    return type(cfg).__name__.lower() if cfg is not None else ""


def metadata(loss_cfg, spec, cfg, dataset, steps_done: int, history: list[dict], base_version: str = "") -> dict[str, str]:
    w, h = max(dataset.buckets, key=lambda wh: wh[0] * wh[1]) if dataset.buckets else (0, 0)
    return training_metadata(
        cat_factor=loss_cfg.alpha, triggers=dataset.triggers, preservation=loss_cfg.preservation,
        class_word=loss_cfg.class_word if isinstance(loss_cfg.class_word, str) else json.dumps(loss_cfg.class_word), steps=cfg.steps, steps_done=steps_done, rank=spec.rank, alpha=spec.alpha,
        lr=cfg.lr, seed=cfg.seed, num_images=len(dataset.items), target_preset=spec.preset, resolution=(w, h),
        base_model_version=base_version, captions=[it[1] for it in dataset.items],
        comment="Contrastive Adapter Training (CAT, arXiv 2404.07554), ComfyUI-CAT",
        extra={"ss_lr_scheduler": cfg.lr_schedule, "cat_preservation_prompts": json.dumps(list(loss_cfg.preservation_prompts)),
               "cat_final_loss": f"{history[-1]['loss']:.6g}" if history else "", **regularizer_metadata(loss_cfg)})


def step_lora_writer(mp, folder, name: str, loss_cfg, spec, cfg, dataset):
    """on_save for train(): `<folder>/<name>_stepNNNNNN.safetensors`, a LoRA any loader reads, with metadata."""
    from ..cat_train.export import save_lora
    from .lora_io import safe_lora_path

    names = kohya_module_names(mp.model.diffusion_model)
    version = base_model_version(mp)

    def write(step: int, weights) -> None:
        meta = metadata(loss_cfg, spec, cfg, dataset, step, [], version)
        path = save_lora(safe_lora_path(folder, f"{name}_step{step:06d}"), to_kohya(weights, names), meta)
        log.info("ComfyUI-CAT: step %d LoRA written to %s", step, path)
    return write
