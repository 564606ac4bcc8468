"""Validation that costs no sampling: the fit and the keep drift at a fixed set of (noise, timestep) points.

The points are drawn once, from their own `torch.Generator(seed)`, `points` per training image, with the
schedule's own timestep distribution (so `fit` estimates what the training loss estimates, without its
per-step noise). At every call, in the model's own prediction space:

    fit         mean over images i and points k of  ||target_ik - pred'(x_t_ik, t_k, y_T_i)||²
    keep_drift  mean over the same points and every prompt y without the trigger (each image's preservation
                prompts, and the probe prompts at every image's points) of  ||pred(x_t, t, y) - pred'(x_t, t, y)||²
    probe_drift the probe prompts' part of keep_drift alone (only when probes are given)

pred is the frozen model (adapter switched off), pred' the adapted one; squared norms are per-element
means, as in the CAT loss. keep_drift is what CAT's second term keeps small, measured the same way on
every call instead of on one random draw, and on prompts the training never saw when probes are given
(neighbouring classes: "a cat" while training "sks dog"). It is exactly 0 while LoRA B = 0 (frozen and
adapted passes run with the same batches, so the zero delta adds nothing, not even rounding).

The frozen predictions do not change during training and are computed once, at the first call. Nothing
here draws from the training RNG or leaves a gradient or a mode flag behind (`observe.observing`), so the
same seed gives the same LoRA with validation on or off.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..adapters.lora import adapter_switched
from ..step.cancel import cancel_point
from ..step.denoiser import Cond, Denoiser
from ..step.objective import mean_sq_diff
from ..step.conds import common_length
from .observe import observing

log = logging.getLogger("cat_train")
PASS_ROWS = 8  # prompt rows per forward (each brings `points` samples)


@dataclass
class _Image:
    latent: Tensor
    cond_token: Cond
    keep: list[Cond] = field(default_factory=list)  # its preservation prompts' conditionings
    noise: Tensor | None = None
    t: Tensor | None = None
    probes: dict[str, Cond] = field(default_factory=dict)  # its own probe prompts' conditionings (auto preservation)


@dataclass
class _Pass:
    """Prediction rows that share a latent shape, run as one batch: which image, which prompt, what it measures."""
    rows: list[tuple[int, Cond, str, str]]  # (image index, unbatched cond, "fit" | "keep" | "probe", probe name or "")


class Validator:
    """`validator(step)` -> {"step", "fit", "keep_drift"[, "probe_drift"]} for the model as it is now.

    examples: the trainer's `Example`s (one per image and preservation prompt; images are found again by
    their shared latent and caption conditioning). probes: optional {name: unbatched Cond} of prompts
    without the trigger to watch besides the preservation prompts. batch_size: images per forward pass
    (each brings `points` rows); the frozen and the adapted passes are batched the same way.
    image_probes: also each example's own `probes` ({name: Cond}, a prompt per image: auto preservation's);
    kinds: which rows to measure (auto preservation measures only "probe"); max_images: n images spread evenly
    over the examples' order (0: all).
    `probe_drifts()` gives each probe's drift alone.
    """

    def __init__(self, denoiser: Denoiser, examples: Sequence, probes: Mapping[str, Cond] | None = None,
                 points: int = 4, seed: int = 0, batch_size: int = 4, image_probes: bool = False,
                 kinds: Sequence[str] = ("fit", "keep", "probe"), max_images: int = 0):
        if points < 1:
            raise ValueError(f"validation points per image must be >= 1, got {points}.")
        if batch_size < 1:
            raise ValueError(f"validation batch_size must be >= 1 image, got {batch_size}.")
        if not examples:
            raise ValueError("validation needs the training examples; the dataset is empty.")
        self.denoiser, self.points, self.probes = denoiser, points, dict(probes or {})
        images: dict[tuple, _Image] = {}
        for ex in (ex for ex in examples if getattr(ex, "drawn", True)):  # caption rows are no images of their own
            # build_examples shares one latent storage and one caption dict across an image's rows
            key = (ex.latent.data_ptr(), tuple(ex.latent.shape), id(ex.cond_token))
            img = images.setdefault(key, _Image(ex.latent, ex.cond_token))
            if not any(c is ex.cond_pres for c in img.keep):
                img.keep.append(ex.cond_pres)
            if image_probes:
                img.probes.update(getattr(ex, "probes", None) or {})
        gen = torch.Generator().manual_seed(seed)
        for img in images.values():
            img.t = denoiser.schedule.sample_t(points, gen)
            img.noise = torch.randn((points, *img.latent.shape), generator=gen)
        found = list(images.values())
        n = min(max_images, len(found)) if max_images else len(found)
        # spread over the dataset's order: a multi-concept folder lists one concept's images after another's
        self.images = [found[i * len(found) // n] for i in range(n)]
        rows_by_shape: dict[tuple, list[tuple[int, Cond, str, str]]] = {}
        for i, img in enumerate(self.images):
            rows = ([(i, img.cond_token, "fit", "")] + [(i, c, "keep", "") for c in img.keep]
                    + [(i, c, "probe", n) for n, c in {**self.probes, **img.probes}.items()])
            rows_by_shape.setdefault(tuple(img.latent.shape), []).extend(r for r in rows if r[2] in kinds)
        # ~batch_size images' rows, PASS_ROWS at most: Cancel is checked between passes, and auto preservation's 150
        # probes made one pass of 600 rows (66 s)
        per = min(PASS_ROWS, batch_size * (2 + len(self.probes) + max(len(img.probes) for img in self.images)))
        self.passes = [_Pass(rows[j:j + per]) for rows in rows_by_shape.values() for j in range(0, len(rows), per)]
        self._frozen: list[Tensor] | None = None  # per pass; its "fit" rows hold the targets

    def _inputs(self, p: _Pass, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Cond]:
        """x_t, t and target of every row's points, and the rows' conditionings, as one batch on device."""
        k, sched = self.points, self.denoiser.schedule
        x0 = torch.cat([self.images[i].latent[None].expand(k, *self.images[i].latent.shape) for i, *_ in p.rows])
        noise = torch.cat([self.images[i].noise for i, *_ in p.rows])
        t = torch.cat([self.images[i].t for i, *_ in p.rows])
        x0, noise, t = x0.to(device, torch.float32), noise.to(device), t.to(device)
        conds = [c for _, c, *_ in p.rows]
        rows = common_length([{key: v.to(device)[None].expand(k, *v.shape) for key, v in c.items()} for c in conds])
        cond = {key: torch.cat([c[key] for c in rows]) for key in conds[0]}
        return sched.add_noise(x0, noise, t), t, sched.target(x0, noise, t, self.denoiser.prediction_type), cond

    def _drifts(self) -> list[tuple[str, str, Tensor]]:
        """(kind, probe name, per-point squared difference) of every row, adapted vs frozen (fit rows: vs the
        target)."""
        den = self.denoiser
        device = next(den.module.parameters()).device
        k = self.points
        with observing(den.module):
            if self._frozen is None:
                with adapter_switched(den.module, False):
                    self._frozen = []
                    for p in self.passes:
                        cancel_point()
                        x_t, t, target, cond = self._inputs(p, device)
                        frozen = den.predict(x_t, t, cond).float().cpu()
                        is_fit = torch.tensor([kind == "fit" for _, _, kind, _ in p.rows]).repeat_interleave(k)
                        frozen[is_fit] = target.float().cpu()[is_fit]  # fit rows compare with the target instead
                        self._frozen.append(frozen)
            out = []
            with adapter_switched(den.module, True):
                for p, ref in zip(self.passes, self._frozen):
                    cancel_point()
                    x_t, t, _, cond = self._inputs(p, device)
                    d = mean_sq_diff(den.predict(x_t, t, cond).float().cpu(), ref)
                    out += [(kind, name, d[r * k:(r + 1) * k]) for r, (_, _, kind, name) in enumerate(p.rows)]
        return out

    def probe_drifts(self) -> dict[str, float]:
        """Each probe's keep drift alone: mean over the points of every measured image that has the probe."""
        return self.probe_and_keep_drifts()[0]

    def probe_and_keep_drifts(self) -> tuple[dict[str, float], float | None]:
        """probe_drifts() and, from the same forwards, the keep drift of the images' own preservation prompts (None
        unless "keep" rows are measured)."""
        by: dict[str, list[Tensor]] = {}
        keep: list[Tensor] = []
        for kind, name, d in self._drifts():
            if kind == "probe":
                by.setdefault(name, []).append(d)
            elif kind == "keep":
                keep.append(d)
        return ({name: float(torch.cat(ds).double().mean()) for name, ds in by.items()},
                float(torch.cat(keep).double().mean()) if keep else None)

    def __call__(self, step: int) -> dict:
        sums: dict[str, list[Tensor]] = {"fit": [], "keep": [], "probe": []}
        for kind, _, d in self._drifts():
            sums[kind].append(d)
        row = {"step": int(step), "fit": float(torch.cat(sums["fit"]).double().mean()),
               "keep_drift": float(torch.cat(sums["keep"] + sums["probe"]).double().mean())}
        if self.probes:
            row["probe_drift"] = float(torch.cat(sums["probe"]).double().mean())
        return row


class ValidationLog:
    """Rows to a CSV (flushed per row, so a live view or a user can read it while training runs), and to
    TensorBoard event files under `tensorboard_dir` when the `tensorboard` package is installed (never required)."""

    def __init__(self, csv_path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None):
        self.path = Path(csv_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._columns: list[str] | None = None
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch's writer needs the tensorboard package
                log.info("tensorboard is not installed; validation goes to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict) -> None:
        if self._columns is None:
            self._columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self._columns)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self._columns])
        self.rows.append(dict(row))
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"validation/{k}", v, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_validation_csv(path: str | os.PathLike) -> list[dict]:
    """The rows back: step as int, numbers as float, anything else (a run name) as text."""
    def value(k: str, v: str):
        if k == "step":
            return int(v)
        try:
            return float(v)
        except ValueError:
            return v
    with Path(path).open(newline="") as f:
        return [{k: value(k, v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def every(n: int, validator: Validator, sink: Callable[[dict], None]) -> Callable:
    """A trainer `callback` that validates after every n-th step and after the last one."""
    if n < 1:
        raise ValueError(f"validate every n steps needs n >= 1, got {n}.")

    def callback(info) -> None:
        if info.step % n == 0 or info.step == info.total:
            sink(validator(info.step))
    return callback
