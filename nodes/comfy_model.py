"""ComfyUI's MODEL (a ModelPatcher) seen through cat_train's `Denoiser` protocol.

Space: DDPM. ComfyUI's `BaseModel.apply_model` works in k-diffusion space (x_k = x_t / sqrt(abar),
sigma = sqrt((1-abar)/abar)) and scales x_k back by 1/sqrt(sigma^2+1) = sqrt(abar) before the UNet,
so the raw UNet input *is* x_t and its timestep is t: `predict` calls the UNet directly and returns
its raw output (eps or v), which is what the CAT loss compares.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from ..cat_train.denoiser import Cond, NoiseSchedule


def prediction_type_of(model) -> str:
    import comfy.model_base as mb

    kind = getattr(model, "model_type", None)
    if kind == mb.ModelType.EPS:
        return "eps"
    if kind == mb.ModelType.V_PREDICTION:
        return "v"
    raise ValueError(f"CAT trains eps- or v-prediction SD models (SD1.x, SD2.x, SDXL); this MODEL is {kind}. "
                     "Flow-matching and EDM models are not supported.")


def schedule_of(model) -> NoiseSchedule:
    ms = model.model_sampling
    if getattr(ms, "alphas_cumprod", None) is not None:
        return NoiseSchedule(torch.as_tensor(ms.alphas_cumprod).detach().cpu())
    sigmas = ms.sigmas.detach().cpu().double()  # discrete SD sampling keeps only sigmas: abar = 1/(sigma^2+1)
    return NoiseSchedule(1.0 / (sigmas * sigmas + 1.0))


class ComfyDenoiser:
    """The Denoiser over `mp.model.diffusion_model`; cond = {"context": (B,L,C)} plus "y" (B,adm) for SDXL."""

    def __init__(self, mp):
        self.patcher = mp
        self.base = mp.model
        self.module = mp.model.diffusion_model
        self.prediction_type = prediction_type_of(mp.model)
        self.schedule = schedule_of(mp.model)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        extra = {k: v for k, v in cond.items() if k != "context"}
        return self.module(x_t, t.float(), context=cond["context"], transformer_options={}, **extra)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """ldm's UNet has no switch: wrap the forward of each layer of every input/middle/output block
        (ldm calls the layers, not the blocks) in a non-reentrant checkpoint, as an instance attribute
        that is deleted again when switched off, so the shared UNet is left as found."""
        wrapped = getattr(self, "_wrapped", [])
        if on and not wrapped:
            m = self.module
            for block in [*m.input_blocks, m.middle_block, *m.output_blocks]:
                for layer in block:
                    layer.forward = _checkpointed(layer.forward)
                    wrapped.append(layer)
        elif not on:
            for block in wrapped:
                del block.forward
            wrapped = []
        self._wrapped = wrapped

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


@contextlib.contextmanager
def trainable(mp) -> Iterator[ComfyDenoiser]:
    """Load the model (with any patches the MODEL already carries) and yield a Denoiser in fp32.

    Restores parameter dtypes and requires_grad flags on exit, so the shared UNet is left as found.
    """
    import comfy.model_management as mm

    mm.load_models_gpu([mp], force_full_load=True)
    module = mp.model.diffusion_model
    _leave_inference_mode(module)
    flags = {n: (p.requires_grad, p.dtype) for n, p in module.named_parameters()}
    low_precision = any(dt != torch.float32 for _, dt in flags.values())
    if low_precision:  # LoRA math in fp16 weights diverges; train on an fp32 copy of the weights
        module.float()
    try:
        yield ComfyDenoiser(mp)
    finally:
        with torch.no_grad():
            for n, p in module.named_parameters():
                rg, dt = flags.get(n, (p.requires_grad, p.dtype))
                if p.dtype != dt:
                    p.data = p.data.to(dt)
                p.requires_grad_(rg)


@torch.inference_mode(False)
def _leave_inference_mode(module: torch.nn.Module) -> None:
    """ComfyUI loads models inside torch.inference_mode, so their weights are inference tensors, which
    autograd may not save for backward (the LoRA gradient flows through frozen base layers). Swap
    each for an ordinary tensor with the same values (bit-identical outputs; done once per model)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def comfy_cond(mp, conditioning, width: int, height: int) -> Cond:
    """CONDITIONING -> UNet kwargs (batched): context, plus y from the model's own encode_adm (SDXL:
    pooled output and size conditioning; sizes from the conditioning if CLIPTextEncodeSDXL set them)."""
    cond, extras = conditioning[0][0], dict(conditioning[0][1])
    kw = dict(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    kw.update({k: extras[k] for k in kw if k in extras})
    adm = mp.model.encode_adm(pooled_output=extras.get("pooled_output"), device=cond.device, prompt_type="positive", **kw)
    out = {"context": cond}
    if adm is not None:
        out["y"] = adm.to(cond.dtype)
    return out
