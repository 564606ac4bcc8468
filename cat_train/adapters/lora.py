"""LoRA on a UNet through peft: inject, switch on/off, read, load, remove: each its own function.

The algorithm (LoRA, DoRA, LoHa, LoKr: `LoraSpec.algorithm`) is one class in algorithms.py; nothing here asks which.

One module tree serves the frozen and the adapted prediction: `adapter_disabled(unet)` turns
every injected layer into its base layer for the duration, with no copy of the UNet. Layer names
are the UNet's own module paths (ldm names for SD), which its model family (`families`) maps to kohya keys.
`LoraAdapter` is all of it as the loop's adapter (`plugs.Adapter`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ContextManager, Iterator

import torch
from torch import nn

from .. import families
from ..options import CHANGED, recorded
from ..step.denoiser import Denoiser
from ..step.plugs import Adapter
from .algorithms import ADAPTER, ALGORITHMS, LoraWeights, of_layer  # noqa: F401  (LoraWeights: its old home)


@dataclass(frozen=True)
class LayerDelta:
    """One injected layer as the layer-local keep estimator sees it (`plugs.Adapter.layer_deltas`)."""
    module: nn.Module
    algorithm: type

    @property
    def needs_base_out(self) -> bool:
        return self.algorithm.delta_needs_base_out

    def energy(self, h, base_out):
        return self.algorithm.delta_energy(self.module, h, base_out)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = field(default=16, metadata={"help": "LoRA rank (>= 1; typical values are 4 to 64)."})
    alpha: float = field(default=16.0, metadata={"help": (
        "LoRA alpha (the trainer node's `lora_alpha`): the LoRA's scale is lora_alpha / rank (lora_alpha = rank: scale "
        "1). Not the CAT factor α (`CatLossConfig.alpha`).")})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)."})
    preset: str = field(default="attn", metadata={"help": (
        "which layers get a LoRA. `attn`: to_q, to_k, to_v, to_out.0 of self- and cross-attention; `attn_ff`: + "
        "feed-forward; `full`: + proj_in/out and the resnet convs (conv1, conv2, conv_shortcut, time_emb_proj). On "
        "SD3/Flux each picks that family's own layers (docs/families.md), or name one (`flux_attn`, `sd3_attn_mlp`, "
        "...).")})
    extra_targets: tuple[str, ...] = field(default_factory=tuple, metadata={"help": "more module-path suffixes to "
                                                                                    "adapt."})
    algorithm: str = field(default="lora", metadata={"recorded": CHANGED, "choices": tuple(ALGORITHMS), "help": (
        "the adapter's algorithm, through peft. `lora`: low-rank B A; `dora`: LoRA plus a trained per-output-row "
        "magnitude (weight decomposition); `loha`: Hadamard product of two rank-r products; `lokr`: Kronecker product "
        "(its low-rank factor has rank `rank`). All load through ComfyUI's stock LoRA loaders (docs/algorithms.md). "
        "Its dropout (`LoraSpec.dropout`, set from Python; no node has it) is LoRA's input dropout and LoHa/LoKr's "
        "module dropout.")})

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
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown adapter algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")

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
        raise ValueError(f"no module of this {family.name} model matches LoRA preset {spec.preset!r} (targets "
                         f"{suffixes}); presets for it: {family.preset_hint()}.")
    return names


def lora_param_count(unet: nn.Module, spec: LoraSpec) -> int:
    """Parameters the spec would add (before injecting), exactly as peft builds them: LoRA rank * (fan_in + fan_out)
    per adapted layer, DoRA + fan_out, LoHa twice LoRA, LoKr its Kronecker factors (algorithms.py)."""
    algo = ALGORITHMS[spec.algorithm]
    return sum(algo.param_count(unet.get_submodule(name), spec) for name in target_modules(unet, spec))


def lora_saved_bytes(unet: nn.Module, spec: LoraSpec) -> int:
    """Bytes the algorithm's forward keeps for backward beyond what a probe of the bare model sees, weights-sized
    (LoRA: 0; LoHa/LoKr: one fp32 copy of every adapted weight, their materialised deltas). Approximate: measured
    0.5-1.0x of that for LoHa/LoKr on the tiny UNet; DoRA also keeps activations this does not count."""
    copies = ALGORITHMS[spec.algorithm].weight_copies
    return 4 * copies * sum(unet.get_submodule(n).weight.numel() for n in target_modules(unet, spec)) if copies else 0


def inject_lora(unet: nn.Module, spec: LoraSpec) -> list[str]:
    """Inject the spec's adapter layers (each algorithm zeroes one factor, so the adapted model equals the base at
    first); freeze the base."""
    from peft import inject_adapter_in_model

    if lora_layers(unet):
        raise RuntimeError("this model already carries CAT/peft LoRA layers; remove_lora() it first.")
    names = target_modules(unet, spec)
    unet.requires_grad_(False)
    inject_adapter_in_model(ALGORITHMS[spec.algorithm].config(spec, names), unet, adapter_name=ADAPTER)
    for _, layer in lora_layers(unet).items():
        # peft gives the adapter its base layer's dtype (bf16, fp16, even fp8); adapter weights and their
        # optimizer state must be fp32 whatever the base is stored in, so cast them back.
        for p in _adapter_params(layer):
            p.data = p.data.float()
            p.requires_grad_(True)
        of_layer(layer).prepare(layer)
    return names


def lora_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The injected peft layers (LoraLayer for LoRA/DoRA, LycorisLayer for LoHa/LoKr), by module path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


def _adapter_params(layer: nn.Module) -> Iterator[nn.Parameter]:
    yield from of_layer(layer).parameters(layer).values()


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


def lora_weights(unet: nn.Module) -> dict:
    """{module path: a detached copy of its adapter}: LoraWeights for LoRA, the algorithm's own type otherwise."""
    return {n: of_layer(layer).weights(layer) for n, layer in lora_layers(unet).items()}


def lora_state(unet: nn.Module) -> dict[str, dict]:
    """{module path: {tensor name: tensor, "alpha": float}}: what a checkpoint holds (LoRA: down, up, alpha)."""
    return {n: {**w.state(), "alpha": w.alpha} for n, w in lora_weights(unet).items()}


def load_lora_weights(unet: nn.Module, weights: dict) -> None:
    """Copy lora_weights()'s snapshots (of the same algorithm) back into the injected layers."""
    load_lora_state(unet, {n: w.state() for n, w in weights.items()})


@torch.no_grad()
def load_lora_state(unet: nn.Module, state: dict[str, dict]) -> None:
    layers = lora_layers(unet)
    missing, unknown = set(layers) - set(state), set(state) - set(layers)
    if missing or unknown:
        raise ValueError(f"LoRA does not fit this model: {len(missing)} adapted modules have no weights "
                         f"(e.g. {sorted(missing)[:2]}), {len(unknown)} weights name no adapted module "
                         f"(e.g. {sorted(unknown)[:2]}); was it trained with the same target preset?")
    for name, tensors in state.items():
        params = of_layer(layers[name]).parameters(layers[name])
        given = {k: v for k, v in tensors.items() if k != "alpha"}
        if set(given) != set(params):
            raise ValueError(f"adapter weights for {name} hold {sorted(given)}, this {of_layer(layers[name]).name} "
                             f"layer has {sorted(params)}; was it trained with the same algorithm and rank?")
        for k, p in params.items():
            if p.shape != given[k].shape:
                raise ValueError(f"LoRA shape mismatch at {name}: expected {k} {tuple(p.shape)}, got "
                                 f"{tuple(given[k].shape)}; was it trained with the same rank?")
            p.copy_(given[k])


def remove_lora(unet: nn.Module) -> None:
    """Put every base layer back where its LoRA wrapper was; base weights were never touched."""
    for name, layer in lora_layers(unet).items():
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, layer.get_base_layer())
    if "peft_config" in vars(unet):  # inject_adapter_in_model leaves its config on the model
        del unet.peft_config


class LoraAdapter(Adapter):
    """LoRA (or DoRA, LoHa, LoKr: the spec's algorithm) in the denoiser's network through peft. A checkpoint keeps
    format 1's keys: "lora" ({module: {tensor name: tensor, "alpha"}}) and "spec"."""

    name = "lora"
    size_hint = "the LoRA rank"

    def __init__(self, spec: LoraSpec):
        self.spec, self.module = spec, None

    def install(self, denoiser: Denoiser, gen: torch.Generator) -> None:
        self.module = denoiser.module
        inject_lora(self.module, self.spec)  # A's init draws from the global RNG, which the loop seeded

    def parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.module)

    def disabled(self) -> ContextManager:
        return adapter_disabled(self.module)

    def state_dict(self) -> dict:
        return {"lora": lora_state(self.module), "spec": recorded(self.spec)}

    def load_state_dict(self, state: dict, where: str) -> None:
        saved = LoraSpec(**{**state["spec"], "extra_targets": tuple(state["spec"].get("extra_targets", ()))})
        if saved != self.spec:
            raise ValueError(f"checkpoint {where} was trained with {saved}, not {self.spec}; resume with the same "
                             "LoRA settings.")
        load_lora_state(self.module, state["lora"])

    def weights(self) -> dict:
        return lora_weights(self.module)

    def layer_deltas(self) -> dict:
        return {n: LayerDelta(m, of_layer(m)) for n, m in lora_layers(self.module).items()}

    def remove(self) -> None:
        remove_lora(self.module)
