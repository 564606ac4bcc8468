"""ComfyUI's MODEL (a ModelPatcher) seen through cat_train's `Denoiser` protocol.

Space: DDPM. ComfyUI's `BaseModel.apply_model` works in k-diffusion space (x_k = x_t / sqrt(abar),
sigma = sqrt((1-abar)/abar)) and scales x_k back by 1/sqrt(sigma^2+1) = sqrt(abar) before the UNet,
so the raw UNet input *is* x_t and its timestep is t: `predict` calls the UNet directly and returns
its raw output (eps or v), which is what the CAT loss compares.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import Tensor

from ..cat_train.denoiser import Cond, NoiseSchedule
from ..cat_train.integrity import changed, module_fingerprint
from ..cat_train.precision import compute_dtype

log = logging.getLogger("ComfyUI-CAT")


SUPPORTED = "SD1.x and SD2.x (eps or v prediction) and SDXL UNets with a discrete DDPM schedule"
# Patcher-level wrappers that act on the sampler, not on one network call: training never runs them.
_SAMPLING_ONLY = {"outer_sample", "prepare_sampling", "sampler_sample", "predict_noise", "calc_cond_batch"}


def check_supported(mp) -> None:
    """Refuse a MODEL the trainer cannot train before anything is loaded, cast or patched."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    net = mp.model.diffusion_model
    if not isinstance(net, UNetModel):
        raise ValueError(f"CAT trains {SUPPORTED}; this MODEL is a {type(mp.model).__name__} with a "
                         f"{type(net).__name__} network. Flow-matching transformers (SD3, Flux) are not supported yet.")
    prediction_type_of(mp)
    transformer_options_of(mp)


def prediction_type_of(mp) -> str:
    """eps or v, read off the patcher's model_sampling (so a ModelSamplingDiscrete node upstream counts)."""
    import comfy.model_sampling as ms_mod

    ms = mp.get_model_object("model_sampling")
    cls = type(ms)
    discrete = isinstance(ms, ms_mod.ModelSamplingDiscrete) and cls.timestep is ms_mod.ModelSamplingDiscrete.timestep
    rule = getattr(cls, "calculate_denoised", None)
    if discrete and rule is ms_mod.V_PREDICTION.calculate_denoised:
        return "v"
    if discrete and rule is ms_mod.EPS.calculate_denoised:
        return "eps"
    raise ValueError(f"CAT trains {SUPPORTED}; this MODEL samples with {cls.__name__} "
                     f"({', '.join(c.__name__ for c in cls.__mro__[1:4])}): EDM, x0, LCM/distilled and flow sampling "
                     "are not supported. Remove the model-sampling node upstream of the trainer or pick eps/v.")


def schedule_of(mp) -> NoiseSchedule:
    """abar_t = 1 / (sigma_t^2 + 1) from the patcher's sigmas (zero-terminal-SNR rescaling included)."""
    sigmas = mp.get_model_object("model_sampling").sigmas.detach().cpu().double()
    return NoiseSchedule(1.0 / (sigmas * sigmas + 1.0))


def _sdpa(func, *args, **kwargs):
    """Attention override for training passes: PyTorch SDPA has a backward whatever backend (sage, flash,
    xformers...) ComfyUI was started with; the global choice is left alone for sampling."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def transformer_options_of(mp) -> dict:
    """The MODEL's transformer_options for a bare network call: attention/block patches and diffusion-model
    wrappers apply as in sampling; what only makes sense around apply_model is refused by name."""
    opts = dict(mp.model_options.get("transformer_options", {}))
    refused = []
    if "model_function_wrapper" in mp.model_options:
        refused.append("model_function_wrapper (e.g. a unet wrapper node)")
    wrappers = {k: dict(v) for k, v in opts.get("wrappers", {}).items()}
    for kind, by_key in getattr(mp, "wrappers", {}).items():
        for key, fns in by_key.items():
            wrappers.setdefault(kind, {}).setdefault(key, [])
            wrappers[kind][key] = list(wrappers[kind][key]) + list(fns)
    for kind, by_key in wrappers.items():
        if kind == "apply_model" and any(by_key.values()):
            refused.append(f"apply_model wrappers {sorted(map(str, by_key))}")
    if refused:
        raise ValueError("the MODEL carries patches the trainer cannot apply to a bare UNet call: " + "; ".join(refused)
                         + ". Train on the MODEL before the node that adds them, and add them after the trainer.")
    ignored = sorted(k for k, by_key in wrappers.items() if k in _SAMPLING_ONLY and any(by_key.values()))
    if ignored:
        log.info("ComfyUI-CAT: sampling-only wrappers not used while training: %s", ", ".join(ignored))
    opts["wrappers"] = {k: v for k, v in wrappers.items() if k not in _SAMPLING_ONLY}
    opts["optimized_attention_override"] = _sdpa
    return opts


class ComfyDenoiser:
    """The Denoiser over `mp.model.diffusion_model`; cond = {"context": (B,L,C)} plus "y" (B,adm) for SDXL.

    Inputs are cast to `compute_dtype` (the weights keep their stored dtype; layers stored in another
    dtype are cast per call by ComfyUI's own cast ops, see `trainable`); the output is in that dtype."""

    def __init__(self, mp, compute_dtype: torch.dtype = torch.float32):
        self.patcher = mp
        self.base = mp.model
        self.module = mp.model.diffusion_model
        self.prediction_type = prediction_type_of(mp)
        self.schedule = schedule_of(mp)
        self.compute_dtype = compute_dtype
        self._options = transformer_options_of(mp)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.compute_dtype
        extra = {k: v.to(dt) for k, v in cond.items() if k != "context"}
        opts = dict(self._options)  # the UNet writes per-call keys (block, transformer_index) into it
        return self.module(x_t.to(dt), t.float(), context=cond["context"].to(dt), transformer_options=opts, **extra)

    def set_gradient_checkpointing(self, on: bool) -> None:
        """ldm's UNet has no switch: wrap the forward of each layer of every input/middle/output block
        (ldm calls the layers, not the blocks) in a non-reentrant checkpoint, as an instance attribute
        that is deleted again when switched off, so the shared UNet is left as found."""
        wrapped = getattr(self, "_wrapped", [])
        if on and not wrapped:
            for layer in checkpoint_units(self.module):
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
        return self.compute_dtype


def checkpoint_units(module) -> list[torch.nn.Module]:
    """The layers gradient checkpointing wraps: each layer of every input, middle and output block."""
    return [layer for block in [*module.input_blocks, module.middle_block, *module.output_blocks] for layer in block]


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _storage_dtype(module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)


def _cast_layers_to(module, dtype: torch.dtype) -> list[tuple[torch.nn.Module, bool]]:
    """Layers whose weights are stored in another dtype than the compute dtype (fp8 storage, an fp32 norm in
    a bf16 model, fp32 compute over bf16 weights) cast their weights per call, as ComfyUI's lowvram and
    manual-cast paths do: the stored tensors are never converted. Returns what to restore."""
    flipped = []
    for m in module.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "comfy_cast_weights") and isinstance(w, torch.Tensor) and w.dtype != dtype:
            flipped.append((m, m.comfy_cast_weights))
            m.comfy_cast_weights = True
    return flipped


@contextlib.contextmanager
def trainable(mp, compute: str = "auto") -> Iterator[ComfyDenoiser]:
    """Load the model (with any patches the MODEL already carries) and yield a Denoiser that computes in the
    chosen dtype while every base weight keeps its stored dtype and device.

    Other models are evicted first (ComfyUI's own trainer does the same). On exit the UNet's tensors are
    checked against per-tensor checksums taken on entry (bits, dtype, device, shape): the input MODEL must
    come back bit-identical, and a difference is raised, never passed over.
    """
    import comfy.model_management as mm

    check_supported(mp)  # before anything is loaded or cast
    mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
    module = mp.model.diffusion_model
    _leave_inference_mode(module)
    before = module_fingerprint(module)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    device = next(module.parameters()).device
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    dtype = compute_dtype(compute, device, _storage_dtype(module), bf16_supported=bf16_ok)
    flipped = _cast_layers_to(module, dtype)
    try:
        yield ComfyDenoiser(mp, dtype)
    finally:
        for m, prev in flipped:
            m.comfy_cast_weights = prev
        for n, p in module.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        bad = changed(before, module_fingerprint(module))
        if bad:
            raise RuntimeError(f"the base UNet changed during training ({len(bad)} tensors, e.g. {bad[:2]}); "
                               "please report this: the input MODEL must stay untouched.")


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
