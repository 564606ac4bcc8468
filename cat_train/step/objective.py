"""The CAT objective.

    L = ||eps - eps_θ'(z_t, t, y_T)||²  +  α · w · ||eps_θ(z_t, t, y) - eps_θ'(z_t, t, y)||²

in the model's own output space (eps, v, or the velocity eps - x0 of flow models; the target follows
`denoiser.prediction_type` and `denoiser.schedule`), squared norms taken as per-element means, w the
weight of the sample's trigger token (multi-concept).
α = 0 is plain LoRA and skips the preservation passes entirely.

Cheaper preservation (`keep_every` k, `keep_fraction` p; both 1 by default = exact CAT): the CAT term runs on every
k-th step only and, on those, on each row of the batch with probability p (an independent draw from the run's
generator per row), weighted α·k/p. Its indicator m has E[m] = p/k over steps and draws, so the expected loss and
gradient equal exact CAT's; steps and rows without it skip the frozen pass and the adapted y rows (docs/method.md).

Terms shape the loss as `plugs.LossTerm`s (APT: cat_train/terms/apt.py; masks: cat_train/terms/mask.py): they may ask
for the frozen pass on y_T too, weight the fit term per sample or per element and add penalties, never an extra
forward pass. The objective knows no adapter kind: the caller says how to get the frozen model (`frozen_model`).
A term that `estimates_keep` (the layer-local keep estimator, cat_train/terms/keep_local.py) gives the CAT term from
what it recorded in the frozen pass: the adapted pass then runs no y rows.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from .conds import cat_cond
from .denoiser import Cond, Denoiser
from .plugs import LossTerm


def preservation_rows(cfg, step: int, n: int, gen: torch.Generator) -> tuple[float, Tensor | None]:
    """This batch's CAT factor and the rows that get the CAT term (None: all) at 0-based optimizer step `step`
    (cfg: a `CatLossConfig`). Draws from `gen` only when keep_fraction < 1 on a step with the term, so exact CAT's
    draws are untouched."""
    if cfg.alpha == 0 or step % cfg.keep_every:
        return 0.0, None
    alpha = cfg.alpha * cfg.keep_every
    if cfg.keep_fraction == 1:
        return alpha, None
    picked = torch.rand(n, generator=gen, dtype=torch.float64) < cfg.keep_fraction
    return alpha / cfg.keep_fraction, picked.nonzero().flatten()


class LossTerms(NamedTuple):
    loss: Tensor  # scalar to minimise
    fit: Tensor   # per-sample ||target - eps_θ'(z_t, t, y_T)||²
    # per-sample ||eps_θ(z_t, t, y) - eps_θ'(z_t, t, y)||² (zeros when alpha = 0 and on rows without the term)
    keep: Tensor
    # per-sample ||target - eps_θ(z_t, t, y_T)||² (weighted as fit): when a term asked for the frozen y_T pass
    fit_pre: Tensor | None = None


def mean_sq_diff(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared difference in fp32: the norm of both CAT terms (and of validation's drift)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def weighted_mean_sq_diff(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """Per-sample sum(w * d²) / sum(w) in fp32, w broadcast against a (masked training); w = 1 gives mean_sq_diff's
    bits (x * 1 and a mean of ones are exact)."""
    w = w.to(a.device, torch.float32).expand_as(a)
    return ((a.float() - b.float()).pow(2) * w).flatten(1).mean(1) / w.flatten(1).mean(1).clamp_min(1e-12)


def cat_loss(pred_token: Tensor, target: Tensor, pred_pres: Tensor | None, frozen_pres: Tensor | None,
             alpha: float, weight: Tensor | None = None, fit_weight: Tensor | None = None,
             penalties: Sequence[Tensor] = (), element_weight: Tensor | None = None,
             keep_rows: Tensor | None = None, keep_estimate: Tensor | None = None) -> LossTerms:
    """keep_estimate: the CAT term's per-row values from an estimator (LossTerm.keep) instead of the two predictions."""
    fit = mean_sq_diff(pred_token, target) if element_weight is None else \
        weighted_mean_sq_diff(pred_token, target, element_weight)
    if alpha == 0:
        keep = torch.zeros_like(fit)
    else:  # pred_pres and frozen_pres (or the estimate) hold only the rows in keep_rows
        kept = mean_sq_diff(pred_pres, frozen_pres) if keep_estimate is None else keep_estimate
        keep = kept if keep_rows is None else torch.zeros_like(fit).index_put((keep_rows,), kept)
    w = torch.ones_like(fit) if weight is None else weight.to(fit)
    loss = ((fit if fit_weight is None else fit_weight.to(fit) * fit) + alpha * w * keep).mean()
    for p in penalties:  # one by one, in the plug-ins' order: the sum's rounding is part of a run's bits
        loss = loss + p
    return LossTerms(loss, fit.detach(), keep.detach())


def cat_objective(denoiser: Denoiser, frozen_model: Callable[[], ContextManager], x0: Tensor, noise: Tensor,
                  t: Tensor, cond_token: Cond, cond_pres: Cond, alpha: float, weight: Tensor | None = None,
                  terms: Sequence[LossTerm] = (), frozen: tuple[Cond, Cond] | None = None,
                  keep_rows: Tensor | None = None) -> LossTerms:
    """One CAT evaluation: frozen pass once without grad; adapted y_T and y passes as one batched forward.

    frozen_model: the context inside which `denoiser` computes as the frozen model (the adapter's `disabled`);
    terms: the loss terms plugged in; frozen: the frozen model's (y_T, y) conditionings where they differ from the
    adapted ones (an adapter in the text encoder); keep_rows: the rows that get the CAT term (`preservation_rows`;
    None: all), the only y rows either pass runs."""
    sched, n = denoiser.schedule, x0.shape[0]
    x_t = sched.add_noise(x0, noise, t)
    target = sched.target(x0, noise, t, denoiser.prediction_type)
    frozen_token, frozen_pres = frozen or (cond_token, cond_pres)
    if keep_rows is not None and len(keep_rows) == 0:
        alpha = 0.0
    token_pass = any(term.needs_frozen_token_pass for term in terms)
    estimator = next((term for term in terms if term.estimates_keep), None) if alpha else None
    adapted_pres = alpha and estimator is None
    pres = _select(keep_rows, x_t, t)
    frozen_rows = (([(x_t, t, frozen_token)] if token_pass else [])
                   + ([(*pres, _select(keep_rows, frozen_pres))] if alpha else []))
    out = None
    if frozen_rows:
        with torch.no_grad(), frozen_model(), _recording(terms, "frozen"):
            out = denoiser.predict(*_rows(frozen_rows))
    # At init (LoRA B = 0) the adapted y rows equal the frozen pass up to CPU GEMM rounding between
    # batch sizes 2B and B (~1e-13 here); an extra frozen forward to make it bit-exact would cost 1/3 more.
    with _recording(terms, "adapted"):
        pred = denoiser.predict(*_rows([(x_t, t, cond_token)]
                                       + ([(*pres, _select(keep_rows, cond_pres))] if adapted_pres else [])))
    fit_weight = _product([term.fit_weight(t) for term in terms])
    element_weight = _product([term.element_weight(pred[:n], out[:n] if token_pass else None) for term in terms])
    penalties = [p for term in terms for p in term.penalty(n)]
    m = n if keep_rows is None else len(keep_rows)
    estimate = estimator.keep(m, out.shape[0]) if estimator is not None else None
    result = cat_loss(pred[:n], target, pred[n:] if adapted_pres else None, out[-m:] if adapted_pres else None, alpha,
                      weight, fit_weight, penalties, element_weight, keep_rows if alpha else None, estimate)
    if not token_pass:
        return result
    # the frozen model's fit weighed as the adapted one's (APT compares the two)
    fit_pre = (mean_sq_diff(out[:n], target) if element_weight is None
               else weighted_mean_sq_diff(out[:n], target, element_weight))
    return result._replace(fit_pre=fit_pre.detach())


def _rows(groups: list[tuple[Tensor, Tensor, Cond]]) -> tuple[Tensor, Tensor, Cond]:
    """One forward's input: each (noisy rows, timesteps, conditioning) group stacked along the batch."""
    if len(groups) == 1:
        return groups[0]
    xs, ts, conds = zip(*groups)
    return torch.cat(xs), torch.cat(ts), cat_cond(*conds)


def _select(rows: Tensor | None, *batched):
    """The given rows of batched tensors or conditionings (all of them for rows None)."""
    if rows is None:
        return batched if len(batched) > 1 else batched[0]
    picked = [{k: v[rows.to(v.device)] for k, v in b.items()} if isinstance(b, dict) else b[rows.to(b.device)]
              for b in batched]
    return picked if len(picked) > 1 else picked[0]


@contextlib.contextmanager
def _recording(terms: Sequence[LossTerm], kind: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for term in terms:
            stack.enter_context(term.recording(kind))
        yield


def _product(weights: list[Tensor | None]) -> Tensor | None:
    out = None
    for w in weights:
        if w is not None:
            out = w if out is None else out * w
    return out
