"""Adapter algorithms (LoRA, DoRA, LoHa, LoKr): one small class each, the shape of ComfyUI's comfy/weight_adapter
registry and peft's variants. The loop and lora.py never ask which one runs: they call these hooks.

Each says which peft config injects it, which injected layers are its own, its trainable tensors by name (the
checkpoint's names), what one adapted layer adds in parameters (the memory budget), the weights snapshot export
writes, and the LoRA file header's network keys. File key names are the ones ComfyUI's stock loader maps
(comfy/weight_adapter lora.py, loha.py, lokr.py; DoRA's `dora_scale` through base.weight_decompose); docs/algorithms.md
says what was measured.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

ADAPTER = "default"  # peft's adapter name for the one adapter CAT trains


def _fans(m: nn.Module) -> tuple[int, int, int]:
    """(fan_out, in channels, kernel area) of a Linear (area 1) or Conv2d."""
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features, 1
    return m.out_channels, m.in_channels // m.groups, m.kernel_size[0] * m.kernel_size[1]


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

    def state(self) -> dict[str, Tensor]:
        """The trained tensors by their checkpoint names (format 1's for LoRA)."""
        return {"down": self.down, "up": self.up}

    def file_tensors(self) -> dict[str, Tensor]:
        """{key suffix: tensor} of the LoRA file, alpha apart (export writes it as a 0-d float32)."""
        return {"lora_down.weight": self.down, "lora_up.weight": self.up}

    @property
    def file_alpha(self) -> float:
        return float(self.alpha)


@dataclass
class DoraWeights(LoraWeights):
    magnitude: Tensor = None    # peft's m: the per-output-row norm DoRA trains, shape (out,) or (1, out, 1, 1)
    dora_scale: Tensor = None   # what the file holds for ComfyUI's weight_decompose, shape (out, 1[, 1, 1])

    def state(self) -> dict[str, Tensor]:
        return {**super().state(), "magnitude": self.magnitude}

    def file_tensors(self) -> dict[str, Tensor]:
        return {**super().file_tensors(), "dora_scale": self.dora_scale}


@dataclass
class LycorisWeights:
    tensors: dict[str, Tensor]  # peft's names, which are also LyCORIS's and ComfyUI's file key suffixes
    alpha: float
    rank: int

    def state(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    def file_tensors(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    @property
    def file_alpha(self) -> float:
        return float(self.alpha)


@dataclass
class LokrWeights(LycorisWeights):
    def file_tensors(self) -> dict[str, Tensor]:
        # peft scales every LoKr layer by alpha / r; ComfyUI (as LyCORIS) scales by alpha / rank only when a factor
        # is low-rank (w1_a/w1_b or w2_a/w2_b) and by 1 when both are full matrices. kron is bilinear, so for those
        # layers the scale goes into lokr_w1 and the file's alpha (= rank) says "scale 1" to every loader.
        t = dict(self.tensors)
        if "lokr_w1" in t and "lokr_w2" in t:
            t["lokr_w1"] = t["lokr_w1"] * (self.alpha / self.rank)
        return t

    @property
    def file_alpha(self) -> float:
        return float(self.rank) if "lokr_w1" in self.tensors and "lokr_w2" in self.tensors else self.alpha


class Algorithm:
    """One adapter algorithm as peft injects it and ComfyUI loads it. Used as a class (no instances)."""

    name: ClassVar[str]
    title: ClassVar[str]  # as users write it, in summaries
    network: ClassVar[dict[str, str]] = {}  # kohya/LyCORIS header keys of its files (LoRA: the defaults)
    # fp32 copies of each adapted weight its forward keeps for backward (LoHa/LoKr: the materialised delta that
    # F.linear/conv2d saves for the input's gradient); the memory budget adds them (docs/algorithms.md)
    weight_copies: ClassVar[int] = 0

    @classmethod
    def config(cls, spec, names: list[str]):
        raise NotImplementedError

    @classmethod
    def owns(cls, layer: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def parameters(cls, layer: nn.Module) -> dict[str, nn.Parameter]:
        """Its trainable tensors in one injected layer, by checkpoint name."""
        raise NotImplementedError

    @classmethod
    def alpha(cls, layer: nn.Module) -> float:
        raise NotImplementedError

    @classmethod
    def param_count(cls, base: nn.Module, spec) -> int:
        """Parameters it adds to one Linear/Conv2d base layer (before injecting)."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, layer: nn.Module) -> None:
        """After injection and the fp32 cast of its tensors: what it changes on peft's layer (DoRA: its norm in fp32,
        so the adapted layer equals its base at init)."""

    @classmethod
    def weights(cls, layer: nn.Module):
        """A detached copy of the layer's adapter, as export and load_lora_weights take it."""
        raise NotImplementedError

    @classmethod
    def metadata(cls) -> dict[str, str]:
        """Header keys of its files beside export.training_metadata's (LoRA: none, the header stays as it was)."""
        return {**cls.network, "cat_algorithm": cls.name} if cls.network else {}

    # the layer-local keep estimator (terms/keep_local.py) needs the base layer's output on h where this is True
    delta_needs_base_out: ClassVar[bool] = True

    @classmethod
    def delta_energy(cls, layer: nn.Module, h: Tensor, base_out: Tensor | None) -> Tensor:
        """Per-row mean of (ΔW h)² over the layer's output, (rows,) fp32: what the adapter adds to the layer's output
        on input h, as its forward in training adds it (peft 0.21: input cast, dropout, module dropout), with grad to
        its tensors. base_out: the base layer's output on h. Generic form: the layer on h minus its base output."""
        return _mean_sq(layer(h) - base_out)


def _copy(t: Tensor) -> Tensor:
    return t.detach().clone()


def _mean_sq(d: Tensor) -> Tensor:
    return d.float().pow(2).flatten(1).mean(1)


class Lora(Algorithm):
    name = "lora"
    title = "LoRA"

    @classmethod
    def config(cls, spec, names):
        from peft import LoraConfig

        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                          init_lora_weights=True)

    @classmethod
    def owns(cls, layer):
        from peft.tuners.lora import LoraLayer

        return isinstance(layer, LoraLayer) and not layer.use_dora.get(ADAPTER, False)

    @classmethod
    def parameters(cls, layer):
        return {"down": layer.lora_A[ADAPTER].weight, "up": layer.lora_B[ADAPTER].weight}

    @classmethod
    def alpha(cls, layer):
        return float(layer.lora_alpha[ADAPTER])

    @classmethod
    def param_count(cls, base, spec):
        out, cin, area = _fans(base)
        return spec.rank * (cin * area + out)

    @classmethod
    def weights(cls, layer):
        return LoraWeights(_copy(layer.lora_A[ADAPTER].weight), _copy(layer.lora_B[ADAPTER].weight), cls.alpha(layer))

    delta_needs_base_out = False

    @classmethod
    def delta_energy(cls, layer, h, base_out):
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        scale = layer.scaling[ADAPTER]
        u = a(layer.lora_dropout[ADAPTER](layer._cast_input_dtype(h, a.weight.dtype)))
        w = b.weight
        if getattr(b, "bias", None) is not None or (w.ndim > 2 and w.shape[2:].numel() != 1):
            return _mean_sq(b(u) * scale)  # a B that is not a plain matrix (peft's lora_bias, a k x k B): build it
        # ||s B u||² = s² u^T (B^T B) u per position: the r x r Gram matrix instead of the out-sized product
        rank = w.shape[1]
        u = (u.movedim(1, -1) if u.ndim > 2 and w.ndim > 2 else u).reshape(u.shape[0], -1, rank).float()
        with torch.autocast(u.device.type, enabled=False):  # the form in fp32 whatever the step's autocast
            bf = w.reshape(w.shape[0], rank).float()
            q = ((u @ (bf.T @ bf)) * u).sum(-1)  # (rows, positions)
        return q.mean(1) * (scale ** 2 / w.shape[0])


class Dora(Lora):
    """LoRA with peft's weight decomposition: W' = m * (W + s B A) / ||W + s B A||, the norm per output row.

    ComfyUI's weight_decompose (comfy/weight_adapter/base.py, 0.3.64), given a dora_scale of shape (out, 1...), computes
    dora_scale * (W + s B A) / (||W|| + eps): the norm of the *base* weight, not of the adapted one (ComfyUI PR #15458,
    open, changes that). The file's dora_scale is therefore m * (||W|| + eps) / ||W + s B A||, which makes the stock
    loader reproduce peft's weights (to fp32 rounding, tests/comfy/test_algorithms_comfy.py); a loader that normalises
    by the adapted weight instead would be off by ||W|| / ||W + s B A|| per row. dora_scale is 2-D/4-D so it never
    hits the 1-D broadcasting bug of ComfyUI issue #12938."""

    name = "dora"
    title = "DoRA"
    weight_copies = 1  # and about one more output per adapted layer, which the budget does not count
    network = {"ss_network_module": "lycoris.kohya",
               "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})}

    @classmethod
    def config(cls, spec, names):
        c = super().config(spec, names)
        c.use_dora = True
        return c

    @classmethod
    def owns(cls, layer):
        from peft.tuners.lora import LoraLayer

        return isinstance(layer, LoraLayer) and layer.use_dora.get(ADAPTER, False)

    @classmethod
    def parameters(cls, layer):
        return {**super().parameters(layer), "magnitude": layer.lora_magnitude_vector[ADAPTER].weight}

    @classmethod
    def param_count(cls, base, spec):
        return super().param_count(base, spec) + _fans(base)[0]

    @classmethod
    @torch.no_grad()
    def prepare(cls, layer):
        # peft takes the row norm in whatever dtype its forward computes in (the base's, the input's, autocast's), and
        # took m = ||W|| at injection in yet another: a bf16 base started 2e-2 away from the frozen model. The norm in
        # fp32 at both places makes m / ||W|| exactly 1 at init whatever the base dtype and autocast.
        dora, base = layer.lora_magnitude_vector[ADAPTER], layer.get_base_layer().weight
        dora.get_weight_norm = _fp32_norm(dora)
        norm = dora.get_weight_norm(weight=base, lora_weight=torch.zeros_like(base), scaling=layer.scaling[ADAPTER])
        dora.weight.copy_(norm.reshape(dora.weight.shape))

    @classmethod
    def weights(cls, layer):
        lora = super().weights(layer)
        magnitude = _copy(layer.lora_magnitude_vector[ADAPTER].weight)
        with torch.no_grad():
            base = layer.get_base_layer().weight.float()
            adapted = base + lora.delta().to(base.device).reshape(base.shape)
            rows = (base.shape[0], *[1] * (base.dim() - 1))
            norm_base = base.reshape(base.shape[0], -1).norm(dim=1).reshape(rows) + torch.finfo(torch.float32).eps
            norm_adapted = adapted.reshape(base.shape[0], -1).norm(dim=1).reshape(rows)
            scale = magnitude.float().reshape(rows) * norm_base / norm_adapted
        return DoraWeights(lora.down, lora.up, lora.alpha, magnitude, scale.cpu())

    delta_needs_base_out = True

    @classmethod
    def delta_energy(cls, layer, h, base_out):
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        dropout = layer.lora_dropout[ADAPTER]
        x = layer._cast_input_dtype(h, a.weight.dtype)
        if isinstance(dropout, nn.Identity) or not layer.training:
            base_result = base_out
        else:  # peft recomputes the base product on the dropped-out input
            x, base_result = dropout(x), None
        delta = layer.lora_magnitude_vector[ADAPTER](x, lora_A=a, lora_B=b, scaling=layer.scaling[ADAPTER],
                                                     base_layer=layer.get_base_layer(), base_result=base_result,
                                                     adapter_name=ADAPTER)
        return _mean_sq(delta)


def _fp32_norm(dora: nn.Module):
    """peft's row norm of W + s dW for this DoRA layer, computed in fp32."""
    norm = type(dora).get_weight_norm

    def fp32(weight, lora_weight, scaling, adapter_name=None):
        return norm(dora, weight.float(), lora_weight.float(), scaling, adapter_name=adapter_name)
    return fp32


class Lycoris(Algorithm):
    """LoHa/LoKr through peft's LycorisLayer: tensors named as in LyCORIS files, scale alpha / rank."""

    layer_class: ClassVar[str]
    weights_class: ClassVar[type] = LycorisWeights

    @classmethod
    def _layer_type(cls):
        import importlib

        module, _, name = cls.layer_class.rpartition(".")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def owns(cls, layer):
        return isinstance(layer, cls._layer_type())

    @classmethod
    def parameters(cls, layer):
        return {n: getattr(layer, n)[ADAPTER] for n in layer.adapter_layer_names if ADAPTER in getattr(layer, n)}

    @classmethod
    def alpha(cls, layer):
        return float(layer.alpha[ADAPTER])

    @classmethod
    def weights(cls, layer):
        return cls.weights_class({n: _copy(p) for n, p in cls.parameters(layer).items()}, cls.alpha(layer),
                                 int(layer.r[ADAPTER]))

    delta_needs_base_out = False

    @classmethod
    def delta_energy(cls, layer, h, base_out):
        if layer.training and not torch.rand(1) > layer.module_dropout[ADAPTER]:  # peft's module dropout: no delta
            return torch.zeros(h.shape[0], device=h.device)
        return _mean_sq(layer._get_delta_activations(ADAPTER, h))  # the materialised delta weight on h


class Loha(Lycoris):
    """Hadamard product of two rank-r products: dW = (alpha / r) (w1_a w1_b) * (w2_a w2_b); peft zeroes w2_b at init."""

    name = "loha"
    title = "LoHa"
    weight_copies = 1
    layer_class = "peft.tuners.loha.LoHaLayer"
    network = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"})}

    @classmethod
    def config(cls, spec, names):
        from peft import LoHaConfig

        # use_effective_conv2d off: conv deltas stay (out, in*kh*kw) matrices, the layout ComfyUI reshapes (its
        # hada_t1/t2 path expects LyCORIS's Tucker factor layout, which differs from peft's)
        return LoHaConfig(r=spec.rank, alpha=spec.alpha, module_dropout=spec.dropout, target_modules=names,
                          init_weights=True, use_effective_conv2d=False)

    @classmethod
    def param_count(cls, base, spec):
        out, cin, area = _fans(base)
        return 2 * spec.rank * (out + cin * area)


class Lokr(Lycoris):
    """Kronecker product dW = (alpha / r) kron(w1, w2) (w2 low-rank where r is below half its size); peft zeroes
    w1 at init."""

    name = "lokr"
    title = "LoKr"
    weight_copies = 1
    layer_class = "peft.tuners.lokr.LoKrLayer"
    weights_class = LokrWeights
    network = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"})}

    @classmethod
    def config(cls, spec, names):
        from peft import LoKrConfig

        return LoKrConfig(r=spec.rank, alpha=spec.alpha, module_dropout=spec.dropout, target_modules=names,
                          init_weights=True, use_effective_conv2d=False, decompose_both=False, decompose_factor=-1)

    @classmethod
    def param_count(cls, base, spec):
        from peft.tuners.lokr.layer import factorization

        out, cin, area = _fans(base)
        (a, b), (c, d) = factorization(out, -1), factorization(cin, -1)
        w1 = a * c  # decompose_both off: w1 is always a full (a, c) matrix
        full_w2 = spec.rank >= max(b, d) / 2  # peft's rule (Linear: `not r < max/2`, the same)
        return w1 + (b * d * area if full_w2 else spec.rank * (b + d * area))


ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (Lora, Dora, Loha, Lokr)}


def of_layer(layer: nn.Module) -> type[Algorithm]:
    """The algorithm an injected peft layer belongs to."""
    for algo in ALGORITHMS.values():
        if algo.owns(layer):
            return algo
    raise TypeError(f"{type(layer).__name__} is a peft layer of no algorithm CAT trains ({', '.join(ALGORITHMS)}).")
