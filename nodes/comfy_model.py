"""ComfyUI's MODEL (a ModelPatcher) seen through cat_train's `Denoiser` protocol.

UNets (SD1.x/SD2/SDXL), space DDPM: ComfyUI's `BaseModel.apply_model` works in k-diffusion space
(x_k = x_t / sqrt(abar), sigma = sqrt((1-abar)/abar)) and scales x_k back by 1/sqrt(sigma^2+1) = sqrt(abar)
before the UNet, so the raw UNet input *is* x_t and its timestep is t: `predict` calls the UNet directly and
returns its raw output (eps or v), which is what the CAT loss compares.

Flow-matching transformers (SD3 MMDiT, Flux), space rectified flow: ComfyUI's CONST sampling feeds x_t
unchanged (`calculate_input` is the identity), the network gets `model_sampling.timestep(sigma)` (SD3:
1000 sigma; Flux: sigma) and its raw output is the velocity eps - x0 (denoised = x_t - sigma * output).
`predict` calls the transformer the same way and returns that velocity.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import Tensor

from ..cat_train import families
from ..cat_train.step.denoiser import Cond, FlowSchedule, NoiseSchedule
from ..cat_train.training.integrity import changed, module_fingerprint
from ..cat_train.training.precision import compute_dtype
from . import compat

log = logging.getLogger("ComfyUI-CAT")


SUPPORTED = ("SD1.x and SD2.x (eps or v prediction) and SDXL UNets with a discrete DDPM schedule, SD3/SD3.5 (MMDiT), "
             "Flux (dev, schnell), Flux.2 (dev, Klein), Chroma and Qwen-Image flow-matching transformers, "
             "Lumina Image 2.0 and Z-Image (NextDiT), HiDream-I1, Wan 2.1/2.2 A14B text-to-video as single frames")
# CONDITIONING entries beyond the text and pooled output that reach the network as they are: {entry: network kwarg}
# (HiDream: the Llama 3.1 hidden states of every layer). The dataset keeps them per caption, so y's pass gets y's.
COND_EXTRAS = {"conditioning_llama3": "encoder_hidden_states_llama3"}
# Patcher-level wrappers that act on the sampler, not on one network call: training never runs them.
_SAMPLING_ONLY = {"outer_sample", "prepare_sampling", "sampler_sample", "predict_noise", "calc_cond_batch"}
# ComfyUI model classes built on its Flux class that are not Flux.1, as users know them
_FLUX_VARIANTS = {"LongCatImage": "LongCat-Image"}


def family_of(mp) -> type[families.Family]:
    """The family of a MODEL the trainer supports (read off the network by `families.of`), once ComfyUI's own
    classes say it is the model that family was written for; anything else is refused, naming what it is."""
    import comfy.model_base as mb
    from comfy.ldm.chroma.model import Chroma as ChromaNet
    from comfy.ldm.flux.model import Flux as FluxNet
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    base, net = mp.model, mp.model.diffusion_model
    try:
        family = families.of(net)
    except ValueError:
        family = None
    written_for = {families.SDUNet: isinstance(net, UNetModel), families.SDXLUNet: isinstance(net, UNetModel),
                   families.SD3: isinstance(base, mb.SD3) and isinstance(net, MMDiT),
                   # Chroma and Flux controlnets reshape the inputs
                   families.Flux: isinstance(base, mb.Flux) and type(net) is FluxNet,
                   families.Flux2: type(base) is getattr(mb, "Flux2", None) and type(net) is FluxNet,
                   families.Chroma: type(base) is mb.Chroma and type(net) is ChromaNet,  # not Chroma Radiance
                   # Qwen-Image and Qwen-Image-Edit (reference latents are not trained); MageFlow reshapes the network
                   families.QwenImage: type(base) is mb.QwenImage and type(net) is QwenImageTransformer2DModel}
    if family is families.Flux2 and not hasattr(mb, "Flux2"):
        raise ValueError("CAT trains Flux.2 on ComfyUI v0.33 or newer: this ComfyUI has no Flux.2 model class; update "
                         "ComfyUI.")
    written_for.update(_written_for_fam_b(base, net))
    if family is None or not written_for.get(family, False):
        raise ValueError(f"CAT trains {SUPPORTED}; this MODEL is a {type(base).__name__} with a "
                         f"{type(net).__name__} network, which is not supported (video, audio and other image models "
                         "are refused).")
    if family is families.QwenImage and not compat.qwen_image_masks_text():
        raise ValueError("CAT trains Qwen-Image on ComfyUI v0.33 or newer: this ComfyUI's Qwen-Image network ignores "
                         "the text attention mask that training batches of captions of different lengths need; update "
                         "ComfyUI.")
    if family is families.Flux and type(base) is not mb.Flux:  # v0.33: LongCatImage subclasses ComfyUI's Flux
        name = type(base).__name__
        raise ValueError(f"CAT trains {SUPPORTED}; this MODEL is {_FLUX_VARIANTS.get(name, name)} (ComfyUI's {name}), "
                         "which runs on Flux's network but is not Flux.1 and is not supported yet: train a Flux.1 "
                         "model.")
    if family is families.Flux and net.params.in_channels != net.params.out_channels:
        p = net.params
        raise ValueError(f"CAT trains {SUPPORTED}; this Flux takes {p.in_channels} input channels for "
                         f"{p.out_channels} output (Fill/Canny/Depth models need an image condition the trainer "
                         "does not build). Train on the base Flux model.")
    return family


def _written_for_fam_b(base, net) -> dict:
    """Lumina 2 and Z-Image: ComfyUI's Lumina2 model (Z-Image is it with Z-Image's config) over its plain NextDiT
    (not Z-Image's pixel-space network); NewBie's pooled CLIP input and Z-Image Omni's SigLIP input are not built.
    HiDream: ComfyUI's HiDream model over its HiDream-I1 network.
    Wan: ComfyUI's WAN21 model (Wan 2.1 and 2.2 A14B) over the plain WanModel, text-to-video only (no image
    channels, CLIP-vision or reference input); Wan 2.2 5B (WAN22: per-frame timesteps) is not."""
    import comfy.model_base as mb
    from comfy.ldm.lumina.model import NextDiT
    from comfy.ldm.wan.model import WanModel

    nextdit = (type(base) is mb.Lumina2 and type(net) is NextDiT and getattr(net, "clip_text_pooled_proj", None) is None
               and getattr(net, "siglip_embedder", None) is None)
    from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel as HiDreamNet

    wan = (type(base) is mb.WAN21 and type(net) is WanModel and not base.image_to_video
           and net.patch_embedding.weight.shape[1] == net.out_dim and getattr(net, "img_emb", None) is None
           and getattr(net, "ref_conv", None) is None)
    return {families.Lumina2: nextdit, families.ZImage: nextdit, families.Wan: wan,
            families.HiDream: type(base) is mb.HiDream and type(net) is HiDreamNet}


# Families whose ComfyUI model class a ComfyUI may lack: (module, class, the family as users know it)
_NEEDS = {"zimage": ("comfy.supported_models", "ZImage", "Z-Image")}


def host_has(family) -> None:
    """Refuse, in one line naming the ComfyUI version needed, a family this ComfyUI cannot build."""
    import importlib

    need = _NEEDS.get(family.name)
    if need and not hasattr(importlib.import_module(need[0]), need[1]):
        raise ValueError(f"{need[2]} needs a ComfyUI with its {need[1]} model class (v0.33 has it, this ComfyUI does "
                         "not): update ComfyUI to train it.")


def base_model_version(mp) -> str:
    """kohya's ss_base_model_version for the loaded model: the families' tag for its config class (or a base of
    it), else the config class name."""
    cfg = getattr(mp.model, "model_config", None)
    if cfg is None:
        return ""
    tag = families.kohya_base_version(c.__name__ for c in type(cfg).__mro__)
    return tag if tag is not None else type(cfg).__name__.lower()


def check_supported(mp) -> None:
    """Refuse a MODEL the trainer cannot train before anything is loaded, cast or patched."""
    family = family_of(mp)
    pred = prediction_type_of(mp)
    if (pred == "flow") != family.flow_matching:
        raise ValueError(f"CAT trains {SUPPORTED}; this {family.name} model samples as {pred!r}, which does not match "
                         "its family (UNets: eps/v, transformers: flow). Remove the model-sampling node upstream.")
    transformer_options_of(mp)


def prediction_type_of(mp) -> str:
    """eps, v or flow, read off the patcher's model_sampling (so a ModelSampling* node upstream counts)."""
    import comfy.model_sampling as ms_mod

    ms = mp.get_model_object("model_sampling")
    cls = type(ms)
    discrete = isinstance(ms, ms_mod.ModelSamplingDiscrete) and cls.timestep is ms_mod.ModelSamplingDiscrete.timestep
    rule = getattr(cls, "calculate_denoised", None)
    if discrete and rule is ms_mod.V_PREDICTION.calculate_denoised:
        return "v"
    if discrete and rule is ms_mod.EPS.calculate_denoised:
        return "eps"
    flow = isinstance(ms, (ms_mod.ModelSamplingDiscreteFlow, ms_mod.ModelSamplingFlux))
    if flow and rule is ms_mod.CONST.calculate_denoised and cls.calculate_input is ms_mod.CONST.calculate_input:
        return "flow"
    raise ValueError(f"CAT trains {SUPPORTED}; this MODEL samples with {cls.__name__} "
                     f"({', '.join(c.__name__ for c in cls.__mro__[1:4])}): EDM, x0, LCM/distilled and Cosmos-style "
                     "flow sampling are not supported. Remove the model-sampling node upstream of the trainer, or pick "
                     "eps/v (UNets) or the model's own flow sampling (SD3, Flux).")


def flow_shift(ms) -> float:
    """The shift s of sigma = s u / (1 + (s-1) u) that the patcher's flow sampling applies (Flux's mu: s = exp(mu))."""
    import math

    import comfy.model_sampling as ms_mod

    return math.exp(ms.shift) if isinstance(ms, ms_mod.ModelSamplingFlux) else float(ms.shift)


def schedule_of(mp, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0):
    """DDPM: abar_t = 1 / (sigma_t^2 + 1) from the patcher's sigmas (zero-terminal-SNR rescaling included).
    Flow: a FlowSchedule with the patcher's own shift (a ModelSamplingSD3/Flux node upstream counts), so
    training draws the noise levels the model is sampled at; sampling/logit_* as in FlowSchedule."""
    ms = mp.get_model_object("model_sampling")
    if prediction_type_of(mp) == "flow":
        return FlowSchedule(flow_shift(ms), sampling, logit_mean, logit_std)
    sigmas = ms.sigmas.detach().cpu().double()
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
    """The Denoiser over `mp.model.diffusion_model`; cond = {"context": (B,L,C)} plus "y" (B,adm) for SDXL
    (ADM) and SD3/Flux (pooled text), and for a family with a guidance input (Flux dev) "guidance" (B,) (default
    `guidance`, else the family's `training_guidance`).

    Inputs are cast to `compute_dtype` (the weights keep their stored dtype; layers stored in another
    dtype are cast per call by ComfyUI's own cast ops, see `trainable`); the output is in that dtype."""

    def __init__(self, mp, compute_dtype: torch.dtype = torch.float32, guidance: float | None = None, **flow_options):
        self.patcher = mp
        self.base = mp.model
        self.module = mp.model.diffusion_model
        self.family = family_of(mp)
        self.prediction_type = prediction_type_of(mp)
        self.schedule = schedule_of(mp, **flow_options)
        self.compute_dtype = compute_dtype
        # Flux schnell: no such input; Chroma's params have no switch: it always takes one
        takes = self.family.training_guidance is not None and getattr(self.module.params, "guidance_embed", True)
        self.guidance = (self.family.training_guidance if guidance is None else guidance) if takes else None
        self._sampling = mp.get_model_object("model_sampling")
        self._options = transformer_options_of(mp)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if "tokens" not in cond:
            return self._predict(x_t, t, cond)
        # whole prompts: rows of one caption length run together on their own tokens (the batch repeated shorter
        # captions to a common length; their first `tokens` are the caption), as ComfyUI never batches them
        lengths = cond["tokens"].reshape(-1).round().long().tolist()
        out = None
        for n in sorted(set(lengths)):
            rows = torch.tensor([i for i, k in enumerate(lengths) if k == n], device=x_t.device)
            part = {k: (v[rows.to(v.device), :n] if k == "context" else v[rows.to(v.device)])
                    for k, v in cond.items() if k != "tokens"}
            y = self._predict(x_t[rows], t[rows.to(t.device)] if t.ndim else t, part)
            out = y.new_empty((x_t.shape[0], *y.shape[1:])) if out is None else out
            out[rows] = y
        return out

    def _predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dt = self.compute_dtype
        extra = {k: v.to(dt) for k, v in cond.items() if k not in ("context", "attention_mask")}
        if "attention_mask" in cond:
            extra["attention_mask"] = self._text_mask(cond["attention_mask"], x_t, dt)
        if issubclass(self.family, families.NextDiT):  # caption length (ComfyUI: the attention mask's sum)
            extra["num_tokens"] = cond["context"].shape[1]
        if getattr(self.family, "video", False):  # one frame: (B, C, H, W) <-> (B, C, 1, H, W)
            return self._call(x_t[:, :, None], t, cond, extra)[:, :, 0]
        return self._call(x_t, t, cond, extra)

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond, extra: dict) -> Tensor:
        dt = self.compute_dtype
        if self.guidance is not None and "guidance" not in extra:
            extra["guidance"] = torch.full((x_t.shape[0],), self.guidance, device=x_t.device, dtype=dt)
        if self.prediction_type == "flow":  # the model's own timestep of sigma, as apply_model computes it
            sigma = self.schedule.sigma(t).float().to(x_t.device)
            t_in = self._sampling.timestep(sigma).float()
        else:
            t_in = t.float()
        opts = dict(self._options)  # the network writes per-call keys (block, transformer_index) into it
        return self.module(x_t.to(dt), t_in, context=cond["context"].to(dt), transformer_options=opts, **extra)

    def _text_mask(self, mask: Tensor, x_t: Tensor, dt: torch.dtype) -> Tensor:
        """The (B, text tokens) mask of padded text as the network takes it: Qwen-Image an integer one over the text
        (it makes it additive itself); Chroma an additive one over all keys, text then image tokens, which its blocks
        hand to attention as is."""
        mask = mask.round().long()
        if self.family is not families.Chroma:
            return mask
        p = self.module.patch_size
        image_tokens = ((x_t.shape[-2] + p // 2) // p) * ((x_t.shape[-1] + p // 2) // p)
        keys = torch.cat([mask, mask.new_ones(mask.shape[0], image_tokens)], 1)
        return ((keys - 1).to(dt) * torch.finfo(dt).max)[:, None, None, :]

    def set_gradient_checkpointing(self, on: bool) -> None:
        """ldm's UNet has no switch (and MMDiT's/Flux's are fixed at build): wrap the forward of each unit of
        its family's `checkpoint_units` in a non-reentrant checkpoint, as an instance attribute
        that is deleted again when switched off, so the shared UNet is left as found."""
        wrapped = getattr(self, "_wrapped", [])
        if on and not wrapped:
            # Flux blocks update their inputs in place (txt +=, x +=), which would change what the checkpoint
            # saved for the recompute: they get copies
            copy = bool(self.family.inplace_norms(self.module))
            for layer in self.family.checkpoint_units(self.module):
                layer.forward = _checkpointed(layer.forward, copy)
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


def _checkpointed(forward, copy_inputs: bool = False):
    from torch.utils.checkpoint import checkpoint

    def copied(*args, **kwargs):
        c = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
        return forward(*map(c, args), **{k: c(v) for k, v in kwargs.items()})

    def run(*args, **kwargs):
        return checkpoint(copied if copy_inputs else forward, *args, use_reentrant=False, **kwargs)
    return run


def _copy_input(forward):
    def run(x, *args, **kwargs):
        return forward(x.clone() if torch.is_grad_enabled() else x, *args, **kwargs)
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
    chosen dtype while every base weight keeps its stored dtype and device. A DynamicVRAM MODEL trains on a
    non-dynamic copy (`compat.training_patcher`); the training passes run with ComfyUI's training flag set
    (`compat.training_passes`), cleared again when this exits.

    Other models are evicted first (ComfyUI's own trainer does the same). On exit the UNet's tensors are
    checked against per-tensor checksums taken on entry (bits, dtype, device, shape): the input MODEL must
    come back bit-identical, and a difference is raised, never passed over.
    """
    import comfy.model_management as mm

    check_supported(mp)  # before anything is loaded or cast
    mp = compat.training_patcher(mp)  # DynamicVRAM: a non-dynamic copy, so the weights sit on the load device
    mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
    module = mp.model.diffusion_model
    leave_inference_mode(module)
    before = module_fingerprint(module)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    device = next(module.parameters()).device
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    dtype = compute_dtype(compute, device, _storage_dtype(module), bf16_supported=bf16_ok)
    flipped = _cast_layers_to(module, dtype)
    guarded = families.of(module).inplace_norms(module)  # in-place updates autograd refuses: give them copies
    for norm in guarded:  # an instance attribute, deleted on exit: the shared network is left as found
        norm.forward = _copy_input(norm.forward)
    try:
        with compat.training_passes():
            yield ComfyDenoiser(mp, dtype)
    finally:
        for norm in guarded:
            del norm.forward
        for m, prev in flipped:
            m.comfy_cast_weights = prev
        for n, p in module.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        bad = changed(before, module_fingerprint(module))
        if bad:
            raise RuntimeError(f"the base network changed during training ({len(bad)} tensors, e.g. {bad[:2]}); "
                               "please report this: the input MODEL must stay untouched.")


@torch.inference_mode(False)
def leave_inference_mode(module: torch.nn.Module) -> None:
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


_SIZES = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def adm_y(mp, pooled, width: int, height: int, device, **sizes):
    """The network's `y` from the model's own encode_adm, or None for a model without one (SD1.x). SDXL: the pooled
    text and size conditioning (this size, no crop, unless `sizes` says otherwise); SD3 and Flux: the pooled text."""
    kw = dict(width=width, height=height, crop_w=0, crop_h=0, target_width=width, target_height=height)
    kw.update(sizes)
    return mp.model.encode_adm(pooled_output=pooled, device=device, prompt_type="positive", **kw)


def model_text(mp, context):
    """Text tokens (B, L, C) as the model's own conditioning hands them to the network: ComfyUI's Flux2 left-pads
    them with zeros to 512 tokens (Mistral's captions are as long as they are); other families as encoded."""
    if family_of(mp) is not families.Flux2:
        return context
    c = mp.model.extra_conds(cross_attn=context, noise=torch.zeros(1, 1, 1, 1), device=context.device, guidance=None)
    return c["c_crossattn"].cond


def comfy_cond(mp, conditioning, width: int, height: int) -> Cond:
    """CONDITIONING -> network kwargs (batched): context, plus y (`adm_y`; sizes from the conditioning if
    CLIPTextEncodeSDXL set them), plus Flux's guidance if a FluxGuidance node set one."""
    cond, extras = conditioning[0][0], dict(conditioning[0][1])
    cond = model_text(mp, cond)
    adm = adm_y(mp, extras.get("pooled_output"), width, height, cond.device,
                **{k: extras[k] for k in _SIZES if k in extras})
    out = {"context": cond}
    if adm is not None:
        out["y"] = adm.to(cond.dtype)
    if "guidance" in extras and family_of(mp).training_guidance is not None:
        out["guidance"] = torch.full((cond.shape[0],), float(extras["guidance"]), dtype=cond.dtype)
    out.update({kw: extras[k] for k, kw in COND_EXTRAS.items() if k in extras})
    out.update(prompt_tokens(mp, cond))
    return out


def prompt_tokens(mp, context: Tensor) -> dict:
    """{"tokens": (B, 1) caption lengths} for a family whose network must see each prompt whole (`whole_prompts`), so
    predict can undo a batch's repetition to a common length; {} for the others."""
    if not family_of(mp).whole_prompts:
        return {}
    return {"tokens": torch.full((*context.shape[:-2], 1), float(context.shape[-2]))}
