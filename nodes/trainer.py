"""The trainer node's work, outside the node class so tests can call it: CAT on a ModelPatcher.

Flow: dataset items -> Examples (captions encoded once, SDXL `y` built per latent size by the model's
encode_adm) -> cat_train.train on the shared UNet (adapter injected, then removed: the UNet is left
bit-identical) -> kohya state dict -> a *clone* of the MODEL patched the stock way (add_patches via
comfy.sd.load_lora_for_models), so any sampler uses it and the input MODEL is untouched.
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import torch

from ..cat_train.adapter import LoraSpec
from ..cat_train.export import ldm_to_diffusers, to_kohya, training_metadata
from ..cat_train.loss import CatLossConfig
from ..cat_train.plot import loss_curve
from ..cat_train.train import Example, StepInfo, TrainConfig, build_examples, train
from .comfy_model import trainable
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

    def cb(info: StepInfo) -> None:
        _send(EVENT, {"node": node_id, "step": info.step, "total": info.total, "loss": info.loss, "fit": info.fit,
                      "keep": info.keep, "lr": info.lr, "elapsed": info.elapsed})
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


def run_name(model_id: str, settings: dict) -> str:
    return "cat-" + hashlib.sha1(repr(sorted(settings.items())).encode() + model_id.encode()).hexdigest()[:10]


@torch.inference_mode(False)
def train_on_model(mp, dataset, loss_cfg: CatLossConfig, spec: LoraSpec, cfg: TrainConfig, node_id: str | None = None,
                   resume: str | None = None):
    """Returns (patched clone, CatLora, loss-curve IMAGE, summary, TrainResult)."""
    import comfy.sd

    t0 = time.perf_counter()
    with trainable(mp) as den:
        before = {k: v.detach().clone() for k, v in den.module.state_dict().items()
                  if any(f".{t}." in k for t in spec.suffixes)}  # only adapted layers are ever touched
        examples = model_examples(mp, dataset, loss_cfg)
        cb = progress_callback(node_id, cfg.steps)
        result = train(den, examples, loss_cfg, spec, cfg, callback=cb, resume=resume or None)
        after = den.module.state_dict()
        bad = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
        if bad or any(".base_layer." in k or "lora_" in k for k in after):
            raise RuntimeError(f"the base UNet changed during training ({len(bad)} tensors, e.g. {bad[:2]}); "
                               "please report this: the input MODEL must stay untouched.")
    sd = CatLora(to_kohya(result.weights, ldm_to_diffusers(n for n, _ in mp.model.diffusion_model.named_modules())))
    sd.metadata = metadata(loss_cfg, spec, cfg, dataset, result)
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


def metadata(loss_cfg, spec, cfg, dataset, result) -> dict[str, str]:
    return training_metadata(
        cat_factor=loss_cfg.alpha, triggers=dataset.triggers, preservation=loss_cfg.preservation,
        class_word=loss_cfg.class_word, steps=cfg.steps, steps_done=result.steps_done, rank=spec.rank, alpha=spec.alpha,
        lr=cfg.lr, seed=cfg.seed, num_images=len(dataset.items), target_preset=spec.preset,
        comment="Contrastive Adapter Training (CAT, arXiv 2404.07554), ComfyUI-CAT",
        extra={"ss_lr_scheduler": cfg.lr_schedule,
               "cat_final_loss": f"{result.history[-1]['loss']:.6g}" if result.history else ""})
