"""Which saved step to keep: a rule over the per-step table (step, IS, KPS, keep drift, fit).

The rule, in order:
  1. A step counts only with a finite IS: a step whose subject was not measured cannot be judged on it.
  2. The steps "near the best" are those with IS >= max(IS) - is_tolerance (absolute; IS is a cosine-based
     score in [0, 1], and differences under ~0.02 are within what another seed moves it on the world).
  3. With a keep-drift bound, a near step must also have a finite keep_drift <= max_keep_drift: the adapted
     model moved the prompts without the trigger by at most that much. An unknown (missing, NaN) drift
     cannot show that it stayed under the bound, so it fails it.
  4. The pick is the EARLIEST step that passes: once the subject is learned (IS near its best), later steps
     only add drift and overfitting, and fewer updates keep more of the base model.
  5. If no near step passes the bound, the pick is the near step with the smallest keep drift (earliest on
     a tie), reported with `within_bound` False and a reason that says the bound was not met, so a user is
     told rather than handed a step that silently breaks the rule.
Ties in IS need no rule of their own: every step within the tolerance is near, and the earliest wins.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence


@dataclass(frozen=True)
class BestStep:
    step: int
    IS: float
    keep_drift: float | None
    within_bound: bool
    best_IS: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pick_best_step(rows: Sequence[Mapping], is_tolerance: float = 0.02,
                   max_keep_drift: float | None = None) -> BestStep:
    """The step the module docstring's rule picks from rows of {"step", "IS"[, "keep_drift", ...]}."""
    if not is_tolerance >= 0:
        raise ValueError(f"IS tolerance must be >= 0, got {is_tolerance}.")
    if max_keep_drift is not None and not max_keep_drift >= 0:
        raise ValueError(f"keep-drift bound must be >= 0 (or None for no bound), got {max_keep_drift}.")
    steps = [r["step"] for r in rows]
    if len(set(steps)) != len(steps):
        raise ValueError("the per-step table lists a step twice "
                         f"({sorted(s for s in set(steps) if steps.count(s) > 1)}); give one row per saved step.")
    scored = sorted((r for r in rows if _finite(r.get("IS"))), key=lambda r: r["step"])
    if not scored:
        raise ValueError("no step has a finite IS; the best step is picked on IS, so score each saved step's trigger "
                         "images against the reference images first.")
    best = max(r["IS"] for r in scored)
    near = [r for r in scored if r["IS"] >= best - is_tolerance]

    def drift(r) -> float | None:
        d = r.get("keep_drift")
        return float(d) if _finite(d) else None

    def result(r, ok: bool, why: str) -> BestStep:
        return BestStep(int(r["step"]), float(r["IS"]), drift(r), ok, float(best), why)

    near_text = f"IS {best:.3f} at best, {len(near)} step(s) within {is_tolerance:g} of it"
    if max_keep_drift is None:
        r = near[0]
        return result(r, True, f"earliest step near the best IS ({near_text}); no keep-drift bound set")
    passing = [r for r in near if drift(r) is not None and drift(r) <= max_keep_drift]
    if passing:
        r = passing[0]
        return result(r, True, f"earliest step near the best IS ({near_text}) with keep drift "
                               f"{drift(r):.4g} <= {max_keep_drift:g}")
    known = [r for r in near if drift(r) is not None]
    r = min(known, key=lambda r: (drift(r), r["step"])) if known else near[0]
    what = f"the least keep drift among them ({drift(r):.4g})" if known else ("the earliest of them (no keep drift "
                                                                              "measured)")
    return result(r, False, f"no step near the best IS ({near_text}) kept its keep drift <= {max_keep_drift:g}; "
                            f"picked {what}. Lower the learning rate or the steps, or raise the CAT factor.")
