"""The layer-local keep estimator (`CatLossConfig.keep_estimator = "local"`): CAT's zero for one frozen forward.

The CAT term is zero when the adapted model predicts on y what the frozen model predicts. A sufficient condition,
layer by layer: every adapted layer l adds nothing on the input the FROZEN model feeds it on (z_t, t, y),

    ΔW_l h_l(y) = 0   for every l   =>   eps_θ'(z_t, t, y) = eps_θ(z_t, t, y)

(by induction along the forward: the first adapted layer sees the frozen input and adds nothing, so everything after
it sees frozen values too). So

    keep_local = Σ_l  w_l · mean ||ΔW_l h_l(y)||²,    w_l = 1 ("unit", the default)  or  1 / mean ||W_l h_l(y)||²  ("relative")

has CAT's zero and needs only the frozen no-grad pass on y, which records each adapted layer's input h_l (and what
the base layer gave), and the small delta computations with their backward: the adapted y pass and its backward
(the doubled batch of exact CAT) are gone. ΔW_l h_l is "the layer with the adapter on minus off" on the recorded h:
computed per algorithm as peft's forward adds it (LoRA: s·B(A(h)), taken as a quadratic form in A h so the
out-sized product is never built; DoRA: its magnitude-scaled output; LoHa/LoKr: the materialised delta weight on h),
so the term holds for every algorithm CAT trains.

It is a stronger constraint than Eq. 3: exact CAT lets one layer's change on y be undone by another's (only the output
counts); keep_local forbids every change on y, compensated or not. Its zero set is a subset of CAT's.

A `plugins.StepTerm` that `estimates_keep`: `loss.cat_objective` then runs no adapted y rows and takes the CAT term's
per-row values from `keep()`. docs/method.md has the derivation and docs/world-bench.md what it does on the world.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .algorithms import ADAPTER, of_layer
from .lora import lora_layers
from .plugins import StepTerm

ESTIMATORS = ("exact", "local")
WEIGHTINGS = ("unit", "relative")
ENERGY_FLOOR = 1e-12  # a layer whose frozen output is all zeros on a row would divide by 0; such a row weighs 1e12


@dataclass(frozen=True)
class LocalKeepSettings:
    """`CatLossConfig.keep_estimator` and `keep_local_weights` as the step-term registry sees them (CatLossConfig.local_keep)."""
    estimator: str = "exact"
    weights: str = "unit"

    @property
    def active(self) -> bool:
        return self.estimator == "local"


def check_settings(estimator: str, weights: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"keep_estimator must be one of {', '.join(ESTIMATORS)} (exact = CAT's own term), got {estimator!r}.")
    if weights not in WEIGHTINGS:
        raise ValueError(f"keep_local_weights must be one of {', '.join(WEIGHTINGS)}, got {weights!r}.")


# ---------------------------------------------------------------- what one adapted layer adds, per algorithm
# Each returns the per-row mean of (ΔW h)² over the layer's output elements, (rows,) in fp32, from the layer's input
# h and, where the algorithm needs it, what its base layer gave on h. They follow peft 0.21's forward for that layer
# (input cast to the adapter's dtype, dropout, module dropout), so "on minus off" is what the adapted pass would add.

def _mean_sq(d: Tensor) -> Tensor:
    return d.float().pow(2).flatten(1).mean(1)


def _lora_energy(layer: nn.Module, h: Tensor, base_out: Tensor | None) -> Tensor:
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


def _dora_energy(layer: nn.Module, h: Tensor, base_out: Tensor | None) -> Tensor:
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


def _lycoris_energy(layer: nn.Module, h: Tensor, base_out: Tensor | None) -> Tensor:
    if layer.training and not torch.rand(1) > layer.module_dropout[ADAPTER]:  # peft's module dropout: no delta
        return torch.zeros(h.shape[0], device=h.device)
    return _mean_sq(layer._get_delta_activations(ADAPTER, h))


def _generic_energy(layer: nn.Module, h: Tensor, base_out: Tensor) -> Tensor:
    """Any other adapter layer: the layer with the adapter on, minus its base output (a second base product)."""
    return _mean_sq(layer(h) - base_out)


# algorithm name -> (energy function, whether it needs the base layer's output on h)
ENERGY: dict[str, tuple[Callable[[nn.Module, Tensor, Tensor | None], Tensor], bool]] = {
    "lora": (_lora_energy, False), "dora": (_dora_energy, True), "loha": (_lycoris_energy, False),
    "lokr": (_lycoris_energy, False)}


def layer_energy(layer: nn.Module, h: Tensor, base_out: Tensor | None) -> Tensor:
    """Per-row mean of (ΔW h)² of one injected layer on input h (base_out: its base layer's output on h)."""
    fn, _ = ENERGY.get(of_layer(layer).name, (_generic_energy, True))
    return fn(layer, h, base_out)


# ---------------------------------------------------------------- the step term
class LocalKeep(StepTerm):
    """Records every adapted layer's input during the frozen pass and gives the CAT term's per-row value from the
    deltas on it (`keep`). Keeps forward hooks on the injected layers (removed by close()); no state to checkpoint."""

    name = "keep_local"
    estimates_keep = True

    def __init__(self, denoiser, cfg: LocalKeepSettings):
        self.cfg = cfg
        self.layers = lora_layers(denoiser.module)
        if not self.layers:
            raise ValueError("keep_estimator 'local' measures the adapter's layers on the frozen model's inputs, and this "
                             "model carries none (an adapter in the text encoder, e.g. CatVersion, has no such layers); "
                             "use keep_estimator 'exact'.")
        self.needs_out = {n: ENERGY.get(of_layer(m).name, (None, True))[1] for n, m in self.layers.items()}
        # per layer, per call in the frozen pass: (input, base output where the algorithm needs it, base output's
        # per-row energy where the weighting needs it)
        self.calls: dict[str, list[tuple[Tensor, Tensor | None, Tensor | None]]] = {n: [] for n in self.layers}
        self.on = False
        self.last: dict = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str):
        def hook(_mod, args, out):
            if self.on:
                self.calls[name].append((args[0], out if self.needs_out[name] else None,
                                         _mean_sq(out) if self.cfg.weights == "relative" else None))
        return hook

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        for c in self.calls.values():
            c.clear()
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def recording(self, kind: str):
        return self._recording() if kind == "frozen" else contextlib.nullcontext()

    def keep(self, rows: int, batch: int) -> Tensor:
        """The CAT term of the last `rows` rows of the frozen pass (its y rows; `batch` rows in all): per row,
        Σ_l w_l · mean (ΔW_l h_l)², with grad to the adapter's parameters. Frees what the frozen pass recorded."""
        terms, seen = [], {}
        try:
            for name, calls in self.calls.items():
                if not calls:
                    raise RuntimeError(f"keep_estimator 'local': the adapted layer {name} was not run by the frozen pass, "
                                       "so its change on y cannot be measured; use keep_estimator 'exact' with this model.")
                layer = self.layers[name]
                for h, out, out_energy in calls:
                    if h.shape[0] != batch or (out is not None and out.shape[0] != batch):
                        raise RuntimeError(f"keep_estimator 'local': the adapted layer {name} received {h.shape[0]} rows "
                                           f"where the frozen pass had {batch} samples (a model that folds other axes "
                                           "into the batch); use keep_estimator 'exact' with this model.")
                    seen[h.data_ptr()] = h[-rows:].numel() * h.element_size()
                    base_out = None if out is None else out[-rows:]
                    energy = layer_energy(layer, h[-rows:], base_out)
                    if out_energy is not None:
                        energy = energy / out_energy[-rows:].clamp_min(ENERGY_FLOOR).to(energy.device)
                    terms.append(energy)
        finally:
            for c in self.calls.values():
                c.clear()
        self.last = {"recorded_mb": sum(seen.values()) / 2**20, "layer_calls": len(terms)}
        out = terms[0]
        for e in terms[1:]:  # in the layers' order: the sum's rounding is part of a run's bits
            out = out + e
        return out

    def report(self) -> dict:
        return dict(self.last)

    @staticmethod
    def metadata(cfg: LocalKeepSettings, history: Sequence[dict] = ()) -> dict[str, str]:
        return {"cat_keep_estimator": cfg.estimator, **({"cat_keep_local_weights": cfg.weights} if cfg.active else {})}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for c in self.calls.values():
            c.clear()
