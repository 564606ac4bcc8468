"""The layer-local keep estimator (`CatLossConfig.keep_estimator = "local"`): CAT's zero for one frozen forward.

The CAT term is zero when the adapted model predicts on y what the frozen model predicts. A sufficient condition,
layer by layer: every adapted layer l adds nothing on the input the FROZEN model feeds it on (z_t, t, y),

    ΔW_l h_l(y) = 0   for every l   =>   eps_θ'(z_t, t, y) = eps_θ(z_t, t, y)

(by induction along the forward: the first adapted layer sees the frozen input and adds nothing, so everything after
it sees frozen values too). So

    keep_local = Σ_l w_l · mean ||ΔW_l h_l(y)||²,  w_l = 1 ("unit", the default) or 1/mean ||W_l h_l(y)||² ("relative")

has CAT's zero and needs only the frozen no-grad pass on y, which records each adapted layer's input h_l (and what
the base layer gave), and the small delta computations with their backward: the adapted y pass and its backward
(the doubled batch of exact CAT) are gone. ΔW_l h_l is "the layer with the adapter on minus off" on the recorded h,
computed by each algorithm as its forward adds it (`adapters.algorithms.Algorithm.delta_energy`; the adapter hands
its layers over as `plugs.Adapter.layer_deltas`), so the term holds for every algorithm CAT trains.

It is a stronger constraint than Eq. 3: exact CAT lets one layer's change on y be undone by another's (only the output
counts); keep_local forbids every change on y, compensated or not. Its zero set is a subset of CAT's.

A `plugs.LossTerm` that `estimates_keep`: `step.objective.cat_objective` then runs no adapted y rows and takes the CAT
term's per-row values from `keep()`. docs/method.md has the derivation and docs/world-bench.md what it does on the
world.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch import Tensor

from ..step.plugs import LossTerm, RunHook

ESTIMATORS = ("exact", "local")
WEIGHTINGS = ("unit", "relative")
ENERGY_FLOOR = 1e-12  # a layer whose frozen output is all zeros on a row would divide by 0; such a row weighs 1e12


@dataclass(frozen=True)
class LocalKeepSettings:
    """`CatLossConfig.keep_estimator` and `keep_local_weights` as the terms registry sees them
    (CatLossConfig.local_keep)."""
    estimator: str = "exact"
    weights: str = "unit"

    def __post_init__(self):
        check_settings(self.estimator, self.weights)

    @property
    def active(self) -> bool:
        return self.estimator == "local"

    def metadata(self, history: Sequence[dict] = ()) -> dict[str, str]:
        # exact CAT writes no key: files from before the option read as what they are, and exact runs' headers stay
        # as they were bit for bit
        return {"cat_keep_estimator": self.estimator, "cat_keep_local_weights": self.weights} if self.active else {}

    def build(self, denoiser, adapter) -> "LocalKeep":
        return LocalKeep(adapter, self)


def check_settings(estimator: str, weights: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"keep_estimator must be one of {', '.join(ESTIMATORS)} (exact = CAT's own term), got "
                         f"{estimator!r}.")
    if weights not in WEIGHTINGS:
        raise ValueError(f"keep_local_weights must be one of {', '.join(WEIGHTINGS)}, got {weights!r}.")


def _mean_sq(d: Tensor) -> Tensor:
    return d.float().pow(2).flatten(1).mean(1)


class LocalKeep(LossTerm, RunHook):
    """Records every adapted layer's input during the frozen pass and gives the CAT term's per-row value from the
    deltas on it (`keep`). Keeps forward hooks on the adapter's layers (removed by close()); no state to checkpoint."""

    name = "keep_local"
    estimates_keep = True

    def __init__(self, adapter, cfg: LocalKeepSettings):
        self.cfg = cfg
        self.layers = adapter.layer_deltas()
        if not self.layers:
            raise ValueError("keep_estimator 'local' measures the adapter's layers on the frozen model's inputs, and "
                             "this model carries none (an adapter in the text encoder, e.g. CatVersion, has no such "
                             "layers); use keep_estimator 'exact'.")
        # per layer, per call in the frozen pass: (input, base output where the algorithm needs it, base output's
        # per-row energy where the weighting needs it)
        self.calls: dict[str, list[tuple[Tensor, Tensor | None, Tensor | None]]] = {n: [] for n in self.layers}
        self.on = False
        self.last: dict = {}
        self.handles = [d.module.register_forward_hook(self._hook(n)) for n, d in self.layers.items()]

    def _hook(self, name: str):
        needs_out = self.layers[name].needs_base_out

        def hook(_mod, args, out):
            if self.on:
                self.calls[name].append((args[0], out if needs_out else None,
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
                    raise RuntimeError(f"keep_estimator 'local': the adapted layer {name} was not run by the frozen "
                                       "pass, so its change on y cannot be measured; use keep_estimator 'exact' with "
                                       "this model.")
                layer = self.layers[name]
                for h, out, out_energy in calls:
                    if h.shape[0] != batch or (out is not None and out.shape[0] != batch):
                        raise RuntimeError(f"keep_estimator 'local': the adapted layer {name} received {h.shape[0]} "
                                           f"rows where the frozen pass had {batch} samples (a model that folds other "
                                           "axes into the batch); use keep_estimator 'exact' with this model.")
                    seen[h.data_ptr()] = h[-rows:].numel() * h.element_size()
                    energy = layer.energy(h[-rows:], None if out is None else out[-rows:])
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

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for c in self.calls.values():
            c.clear()
