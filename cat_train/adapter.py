"""LoRA on a UNet through peft: inject, switch on/off, read, load, remove: each its own function.

One module tree serves the frozen and the adapted prediction: `adapter_disabled(unet)` turns
every injected layer into its base layer for the duration, with no copy of the UNet. Layer names
are the UNet's own module paths (ldm names for SD), which its model family (`families`) maps to kohya keys.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from . import families

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    rank: int = field(default=16, metadata={"help": "LoRA rank (>= 1; typical values are 4 to 64)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scale = alpha / rank (alpha = rank: scale 1)."})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)."})
    preset: str = field(default="attn", metadata={"help": (
        "which layers get a LoRA. `attn`: to_q, to_k, to_v, to_out.0 of self- and cross-attention; `attn_ff`: + "
        "feed-forward; `full`: + proj_in/out and the resnet convs (conv1, conv2, conv_shortcut, time_emb_proj). On "
        "SD3/Flux each picks that family's own layers (docs/families.md), or name one (`flux_attn`, `sd3_attn_mlp`, ...).")})
    extra_targets: tuple[str, ...] = field(default_factory=tuple, metadata={"help": "more module-path suffixes to adapt."})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}; typical values are 4 to 64.")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):  # NaN used to pass and train to a NaN loss
            raise ValueError(f"LoRA alpha (lora_alpha) must be a finite number > 0, got {self.alpha}; alpha = rank "
                             "gives scale 1 (the trainer's default: 16 with rank 16).")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if self.preset not in families.TARGETS:
            raise ValueError(f"unknown target preset {self.preset!r}; choose one of {sorted(families.TARGETS)}.")

    @property
    def suffixes(self) -> tuple[str, ...]:
        return families.target_suffixes(self.preset) + tuple(self.extra_targets)


def target_suffixes(unet: nn.Module, spec: LoraSpec) -> tuple[str, ...]:
    """The module-path suffixes the spec adapts on this network ('attn'/'attn_ff'/'full': its family's own)."""
    return families.target_suffixes(families.of(unet).target_choice(spec.preset)) + tuple(spec.extra_targets)


def target_modules(unet: nn.Module, spec: LoraSpec) -> list[str]:
    """Module paths of the Linear/Conv2d layers the spec adapts (Identity skips are not layers)."""
    suffixes = target_suffixes(unet, spec)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        family = families.of(unet)
        raise ValueError(f"no module of this {family.name} model matches LoRA preset {spec.preset!r} (targets {suffixes}); "
                         f"presets for it: {family.preset_hint()}.")
    return names


def lora_param_count(unet: nn.Module, spec: LoraSpec) -> int:
    """Parameters the spec would add: rank * (fan_in + fan_out) per adapted layer (before injecting)."""
    n = 0
    for name in target_modules(unet, spec):
        m = unet.get_submodule(name)
        fan_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        fan_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        n += spec.rank * (fan_in + fan_out)
    return n


def inject_lora(unet: nn.Module, spec: LoraSpec) -> list[str]:
    """Inject LoRA layers (B = 0, so the adapted model equals the base at first); freeze the base."""
    from peft import LoraConfig, inject_adapter_in_model

    if lora_layers(unet):
        raise RuntimeError("this model already carries CAT/peft LoRA layers; remove_lora() it first.")
    names = target_modules(unet, spec)
    unet.requires_grad_(False)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                        init_lora_weights=True)
    inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for _, layer in lora_layers(unet).items():
        # peft gives the adapter its base layer's dtype (bf16, fp16, even fp8); LoRA weights and their
        # optimizer state must be fp32 whatever the base is stored in, so cast them back.
        layer.lora_A[ADAPTER].float()
        layer.lora_B[ADAPTER].float()
        for p in _adapter_params(layer):
            p.requires_grad_(True)
    return names


def lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _adapter_params(layer: nn.Module) -> Iterator[nn.Parameter]:
    yield from layer.lora_A[ADAPTER].parameters()
    yield from layer.lora_B[ADAPTER].parameters()


def adapter_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for layer in lora_layers(unet).values() for p in _adapter_params(layer)]


def set_adapter_enabled(unet: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(unet).values():
        layer._disable_adapters = not enabled  # peft's own flag; enable_adapters() would also flip requires_grad


@contextlib.contextmanager
def adapter_disabled(unet: nn.Module) -> Iterator[None]:
    """The frozen base model eps_theta, on the same module tree."""
    set_adapter_enabled(unet, False)
    try:
        yield
    finally:
        set_adapter_enabled(unet, True)


@contextlib.contextmanager
def adapter_switched(unet: nn.Module, enabled: bool) -> Iterator[None]:
    """Every injected layer on (or off) for the duration, then each layer back as it was: a preview or a
    validation pass run from inside training must leave the switch as training (or a user) had set it."""
    before = {n: layer._disable_adapters for n, layer in lora_layers(unet).items()}
    set_adapter_enabled(unet, enabled)
    try:
        yield
    finally:
        for n, layer in lora_layers(unet).items():
            layer._disable_adapters = before.get(n, layer._disable_adapters)


@dataclass
class LoraWeights:
    down: Tensor   # (rank, in) or (rank, in, kh, kw): kohya lora_down, peft lora_A
    up: Tensor     # (out, rank) or (out, rank, 1, 1): kohya lora_up, peft lora_B
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> Tensor:
        """The weight change W' - W this LoRA applies: (alpha / rank) * up @ down."""
        scale = self.alpha / self.rank
        if self.down.ndim == 2:
            return scale * self.up @ self.down
        return scale * torch.einsum("or,rikl->oikl", self.up.flatten(1), self.down)


def lora_weights(unet: nn.Module) -> dict[str, LoraWeights]:
    return {n: LoraWeights(layer.lora_A[ADAPTER].weight.detach().clone(), layer.lora_B[ADAPTER].weight.detach().clone(),
                           float(layer.lora_alpha[ADAPTER]))
            for n, layer in lora_layers(unet).items()}


@torch.no_grad()
def load_lora_weights(unet: nn.Module, weights: dict[str, LoraWeights]) -> None:
    layers = lora_layers(unet)
    missing, unknown = set(layers) - set(weights), set(weights) - set(layers)
    if missing or unknown:
        raise ValueError(f"LoRA does not fit this model: {len(missing)} adapted modules have no weights "
                         f"(e.g. {sorted(missing)[:2]}), {len(unknown)} weights name no adapted module "
                         f"(e.g. {sorted(unknown)[:2]}); was it trained with the same target preset?")
    for name, w in weights.items():
        layer = layers[name]
        if layer.lora_A[ADAPTER].weight.shape != w.down.shape or layer.lora_B[ADAPTER].weight.shape != w.up.shape:
            raise ValueError(f"LoRA shape mismatch at {name}: expected down {tuple(layer.lora_A[ADAPTER].weight.shape)}, "
                             f"got {tuple(w.down.shape)}; was it trained with the same rank?")
        layer.lora_A[ADAPTER].weight.copy_(w.down)
        layer.lora_B[ADAPTER].weight.copy_(w.up)


def remove_lora(unet: nn.Module) -> None:
    """Put every base layer back where its LoRA wrapper was; base weights were never touched."""
    for name, layer in lora_layers(unet).items():
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, layer.get_base_layer())
    if "peft_config" in vars(unet):  # inject_adapter_in_model leaves its config on the model
        del unet.peft_config
