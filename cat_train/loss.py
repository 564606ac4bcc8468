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

Regularizers plug in as `plugins.StepTerm`s (APT: cat_train/apt.py; masks: cat_train/mask.py): they may ask for
the frozen pass on y_T too, weight the fit term per sample or per element and add penalties, never an extra
forward pass.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from .lora import adapter_disabled
from .apt_config import AptConfig
from .auto_config import AutoPreservationConfig
from .denoiser import Cond, Denoiser
from .keep_local import LocalKeepSettings
from .keep_local import check_settings as check_local_settings
from .mask import MaskSettings
from .mask import check_settings as check_mask_settings
from .plugins import StepTerm
from .prompts import PreservationMode, parse_class_words

log = logging.getLogger("cat_train")


@dataclass
class CatLossConfig:
    alpha: float = field(default=1.0, metadata={"help": (
        "CAT factor α, the weight of the CAT term; 0 = plain LoRA (the preservation passes are skipped). Must be >= 0; "
        "the paper tried 0.5, 1, 1.5 and 2.")})
    preservation: PreservationMode = field(default="class", metadata={"help": (
        "how y is made from the caption y_T: `class` (trigger replaced by the class word: 'sks dog' -> 'dog', not "
        "'dog dog'), `strip` (trigger removed) or `empty` ('').")})
    class_word: str | dict[str, str] = field(default="", metadata={"help": (
        "for `class` preservation: the word that replaces the trigger; one word, or one per trigger "
        "('sks=dog, zwx=cat', or a dict).")})
    token_weights: dict[str, float] = field(default_factory=dict, metadata={"help": (
        "multi-concept: weight of each trigger's preservation term (1.0 if absent; a caption with several triggers "
        "takes their mean). In the node one 'token=weight' per line.")})
    preservation_prompts: tuple[str, ...] = field(default=(), metadata={"help": (
        "optional prompts each image is paired with as y, every one in turn, so the CAT term keeps all of them (e.g. "
        "neighbouring classes a leak scan flagged); empty: y from the caption by the preservation mode. In the node "
        "one prompt per line.")})
    min_snr_gamma: float = field(default=0.0, metadata={"since": "0.2.0", "min": 0.0, "max": 100.0, "step": 0.5, "help": (
        "min-SNR-γ weighting of the fit term (Hang et al. 2023; kohya's and diffusers' min_snr_gamma, 5 is the usual "
        "value): eps models min(SNR, γ)/SNR, v models min(SNR, γ)/(SNR + 1), flow models min(SNR, γ)·σ², SNR = "
        "((1-σ)/σ)² (the same x0-space weight). The keep term is not weighted. 0 = off (cat_train/timestep_weighting.py).")})
    apt: AptConfig = field(default_factory=AptConfig, metadata={"help": (
        "APT's regularizers (AptConfig, cat_train/apt.py), all off by default. In ComfyUI an APT Options node feeds "
        "CAT Loss Config's optional `apt` input; the LoRA records them as `cat_apt`.")})
    auto: AutoPreservationConfig = field(default_factory=AutoPreservationConfig, metadata={"help": (
        "auto preservation (AutoPreservationConfig, cat_train/auto.py), off by default: every N steps the probes' keep "
        "drift is measured and the worst are added to the preservation prompts. In ComfyUI an Auto Preservation node "
        "feeds CAT Loss Config's optional `auto` input; the LoRA records the settings and the probes added.")})
    mask_floor: float = field(default=1.0, metadata={"since": "0.2.0", "min": 0.0, "max": 1.0, "step": 0.01, "help": (
        "masked training: fit weight of the background (mask 0), the subject weighing 1; 1 = masks off, 0 = the "
        "background is not fitted at all (OneTrainer's default unmasked weight: 0.1). The fit is the mask-weighted mean "
        "over the latent. Masks come from the dataset (<name>-masklabel.png beside the image, else its alpha channel; "
        "docs/dataset.md); images without one weigh 1 everywhere. Not with APT's augmentations.")})
    mask_keep: float = field(default=0.0, metadata={"since": "0.2.0", "min": 0.0, "max": 100.0, "step": 0.1, "help": (
        "masked training: weight of the background keep term (ai-toolkit's \"inverted-mask prior\"): outside the mask the "
        "adapted prediction on the caption y_T is pulled to the frozen model's on the same y_T, noise and timestep, so "
        "the LoRA does not learn the backgrounds; 0 = off. Runs the frozen y_T pass (as APT does).")})
    keep_every: int = field(default=1, metadata={"since": "0.2.0", "min": 1, "max": 1000, "help": (
        "cheaper preservation: the CAT term on every k-th step only (steps 1, k+1, 2k+1, ...), weighted α·k so the "
        "expected loss is exact CAT's; the other steps cost a plain LoRA step (no frozen pass, no doubled batch). "
        "1 = every step (exact CAT).")})
    keep_fraction: float = field(default=1.0, metadata={"since": "0.2.0", "min": 0.01, "max": 1.0, "step": 0.01, "help": (
        "cheaper preservation: on a step with the CAT term, each batch row gets it with this probability (drawn from "
        "the run's seed), weighted α/p so the expected loss is exact CAT's; rows without it skip the frozen pass and "
        "their adapted y row. 1 = every row (exact CAT).")})
    keep_estimator: str = field(default="exact", metadata={"since": "0.2.0", "choices": ("exact", "local"), "help": (
        "how the CAT term is computed. `exact`: the paper's, the adapted model's prediction on y against the frozen "
        "one's (a doubled adapted batch: ~2-2.5x a plain step on CPU). `local`: each adapted layer's change on the input "
        "the frozen model feeds it on y, Σ_l w_l·mean||ΔW_l h_l(y)||² (cat_train/keep_local.py): zero only where CAT's "
        "term is zero, but stricter (no change on y in any layer, even one a later layer would undo), for the frozen "
        "pass alone (~1.5x a plain step on CPU). On the world benchmark it kept the class as exact CAT did with noisier "
        "trigger images (docs/world-bench.md). The logged keep is then this term, not the prediction gap.")})
    keep_local_weights: str = field(default="unit", metadata={"since": "0.2.0", "choices": ("unit", "relative"), "help": (
        "keep_estimator `local`: each layer's weight w_l. `unit`: 1; `relative`: 1/mean||W_l h_l||², each layer's change "
        "relative to what the frozen layer outputs (on the world benchmark it lost the identity in a quarter of the "
        "trigger images at α = 1; unit kept it in all). Not a node widget.")})

    def __post_init__(self):
        if not self.alpha >= 0:  # also catches NaN
            raise ValueError(f"CAT factor alpha must be >= 0 (0 = plain LoRA; the paper used 0.5-2), got {self.alpha}.")
        if self.preservation not in ("empty", "strip", "class"):
            raise ValueError(f"preservation must be 'empty', 'strip' or 'class', got {self.preservation!r}.")
        self.class_word = parse_class_words(self.class_word)
        self.preservation_prompts = tuple(p.strip() for p in self.preservation_prompts if p.strip())
        if isinstance(self.apt, dict):  # as stored in a checkpoint
            self.apt = AptConfig(**self.apt)
        if isinstance(self.auto, dict):
            self.auto = AutoPreservationConfig(**self.auto)
        if self.auto.active and self.alpha == 0:
            raise ValueError("auto preservation adds prompts to the CAT term, which alpha = 0 (plain LoRA) switches off; "
                             "set the CAT factor > 0 or auto preservation `every` to 0.")
        if not (self.min_snr_gamma >= 0 and math.isfinite(self.min_snr_gamma)):
            raise ValueError(f"min_snr_gamma must be a finite number >= 0 (0 = off; 5 is the usual value), got {self.min_snr_gamma}.")
        check_mask_settings(self.mask_floor, self.mask_keep)
        apt = self.apt
        if self.mask.active and apt.adaptive and apt.adapt_augment and apt.augment_ops:
            raise ValueError("masked training (mask_floor < 1 or mask_keep > 0) weights the latent where the image's "
                             "mask is, which APT's augmentations move; turn one off: APT's augment_ops empty (or "
                             "adapt_augment off), or mask_floor 1 and mask_keep 0.")
        if isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 1:
            raise ValueError(f"keep_every must be a whole number >= 1 (1 = the CAT term on every step), got {self.keep_every!r}.")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1] (1 = the CAT term on every row), got {self.keep_fraction!r}.")
        check_local_settings(self.keep_estimator, self.keep_local_weights)
        if self.alpha == 0 and (self.keep_every != 1 or self.keep_fraction != 1):
            raise ValueError("keep_every and keep_fraction thin out the CAT term, which alpha = 0 (plain LoRA) switches "
                             "off; set both to 1, or the CAT factor > 0.")
        bad = {t: w for t, w in self.token_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"token weights must be >= 0, got {bad}.")

    @property
    def mask(self) -> MaskSettings:
        """The masked-training settings as one plug-in config (the step-term registry's `mask` entry)."""
        return MaskSettings(self.mask_floor, self.mask_keep)

    @property
    def local_keep(self) -> LocalKeepSettings:
        """keep_estimator and keep_local_weights as one plug-in config (the step-term registry's `local_keep` entry)."""
        return LocalKeepSettings(self.keep_estimator, self.keep_local_weights)


def preservation_rows(cfg: CatLossConfig, step: int, n: int, gen: torch.Generator) -> tuple[float, Tensor | None]:
    """This batch's CAT factor and the rows that get the CAT term (None: all) at 0-based optimizer step `step`.
    Draws from `gen` only when keep_fraction < 1 on a step with the term, so exact CAT's draws are untouched."""
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
    keep: Tensor  # per-sample ||eps_θ(z_t, t, y) - eps_θ'(z_t, t, y)||² (zeros when alpha = 0 and on rows without the term)
    fit_pre: Tensor | None = None  # per-sample ||target - eps_θ(z_t, t, y_T)||² (weighted as fit): when a term asked for the frozen y_T pass


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
    """keep_estimate: the CAT term's per-row values from an estimator (keep_local) instead of the two predictions."""
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


def repeat_to_common_length(contexts: list[Tensor], dim: int = 1) -> list[Tensor]:
    """Token sequences of different lengths (a long caption has more 77-token chunks) brought to their least
    common multiple by repeating each whole, as ComfyUI batches conditionings: cross-attention over a
    sequence repeated k times equals attention over it once, so no caption changes another's result."""
    lengths = {c.shape[dim] for c in contexts}
    if len(lengths) == 1:
        return contexts
    n = math.lcm(*lengths)
    if n // min(lengths) > MAX_REPEAT:  # 20 and 21 chunks: 420 chunks, a step 100x slower and GBs more
        return _cyclic_to_longest(contexts, dim, max(lengths))
    return [c if c.shape[dim] == n else c.repeat(*[n // c.shape[dim] if d == dim else 1 for d in range(c.ndim)])
            for c in contexts]


# ComfyUI's own bound (comfy/conds.py CONDCrossAttn.can_concat): past 4x repetition it stops batching conditionings.
MAX_REPEAT = 4
_warned: set[tuple[int, ...]] = set()


def _cyclic_to_longest(contexts: list[Tensor], dim: int, n: int) -> list[Tensor]:
    """Lengths whose common multiple is too large (a trigger on a 75-token chunk boundary gives y_T one chunk more than
    y): each shorter sequence is repeated and cut at the longest length. Not exact as whole repeats are (the first
    chunks weigh a little more in attention), so it is said once per set of lengths."""
    key = tuple(sorted({c.shape[dim] for c in contexts}))
    if key not in _warned:
        _warned.add(key)
        log.warning("conditionings of %s tokens would be padded to their common multiple (%d tokens, %dx the shortest); "
                    "the shorter ones are repeated up to the longest (%d tokens) instead, an approximation. Shorten "
                    "long captions below 75 tokens, or keep the trigger away from a 75-token boundary, to train them "
                    "exactly.", " and ".join(map(str, key)), math.lcm(*key), math.lcm(*key) // key[0], n)
    out = []
    for c in contexts:
        k = c.shape[dim]
        if k != n:
            c = c.repeat(*[-(-n // k) if d == dim else 1 for d in range(c.ndim)]).narrow(dim, 0, n)
        out.append(c)
    return out


def cat_cond(*conds: Cond) -> Cond:
    """Stack conditionings along the batch (contexts of different token lengths repeated to a common one)."""
    keys = conds[0].keys()
    for c in conds[1:]:
        if c.keys() != keys or any(c[k].shape[2:] != conds[0][k].shape[2:] for k in keys if k == "context") \
                or any(c[k].shape[1:] != conds[0][k].shape[1:] for k in keys if k != "context"):
            raise ValueError("token and preservation conditionings differ in shape; encode both with the same text encoder.")
    return {k: torch.cat(repeat_to_common_length([c[k] for c in conds]) if k == "context" else [c[k] for c in conds])
            for k in keys}


def cat_objective(denoiser: Denoiser, x0: Tensor, noise: Tensor, t: Tensor, cond_token: Cond, cond_pres: Cond,
                  alpha: float, weight: Tensor | None = None, terms: Sequence[StepTerm] = (),
                  frozen: tuple[Cond, Cond] | None = None,
                  disabled: Callable[[], ContextManager] | None = None, keep_rows: Tensor | None = None) -> LossTerms:
    """One CAT evaluation: frozen pass once without grad; adapted y_T and y passes as one batched forward.

    terms: plugged-in regularizers; frozen: the frozen model's (y_T, y) conditionings where they differ from the
    adapted ones (an adapter in the text encoder); disabled: the context giving the frozen model (default: LoRA off);
    keep_rows: the rows that get the CAT term (`preservation_rows`; None: all), the only y rows either pass runs.
    A term that `estimates_keep` (keep_local) gives the CAT term from the frozen pass alone: no adapted y rows run."""
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
    frozen_rows = ([(x_t, t, frozen_token)] if token_pass else []) + ([(*pres, _select(keep_rows, frozen_pres))] if alpha else [])
    out = None
    if frozen_rows:
        disabled = disabled or (lambda: adapter_disabled(denoiser.module))
        with torch.no_grad(), disabled(), _recording(terms, "frozen"):
            out = denoiser.predict(*_rows(frozen_rows))
    # At init (LoRA B = 0) the adapted y rows equal the frozen pass up to CPU GEMM rounding between
    # batch sizes 2B and B (~1e-13 here); an extra frozen forward to make it bit-exact would cost 1/3 more.
    with _recording(terms, "adapted"):
        pred = denoiser.predict(*_rows([(x_t, t, cond_token)] + ([(*pres, _select(keep_rows, cond_pres))] if adapted_pres else [])))
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
    fit_pre = mean_sq_diff(out[:n], target) if element_weight is None else weighted_mean_sq_diff(out[:n], target, element_weight)
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
def _recording(terms: Sequence[StepTerm], kind: str) -> Iterator[None]:
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
