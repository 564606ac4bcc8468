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

from .adapter import adapter_switched
from .denoiser import Cond, Denoiser
from .observe import observing

log = logging.getLogger("cat_train")


def _sq_diff(a: Tensor, b: Tensor) -> Tensor:
    """Per-row mean squared difference in fp32, the CAT loss's norm."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def _rows(cond: Cond, n: int, device: torch.device) -> Cond:
    """An unbatched conditioning (an Example's) as n identical rows."""
    return {k: v.to(device)[None].expand(n, *v.shape) for k, v in cond.items()}


@dataclass
class _Image:
    latent: Tensor
    cond_token: Cond
    keep: list[Cond] = field(default_factory=list)  # its preservation prompts' conditionings
    noise: Tensor | None = None
    t: Tensor | None = None


class Validator:
    """`validator(step)` -> {"step", "fit", "keep_drift"[, "probe_drift"]} for the model as it is now.

    examples: the trainer's `Example`s (one per image and preservation prompt; images are found again by
    their shared latent and caption conditioning). probes: optional {name: unbatched Cond} of prompts
    without the trigger to watch besides the preservation prompts.
    """

    def __init__(self, denoiser: Denoiser, examples: Sequence, probes: Mapping[str, Cond] | None = None,
                 points: int = 4, seed: int = 0):
        if points < 1:
            raise ValueError(f"validation points per image must be >= 1, got {points}.")
        if not examples:
            raise ValueError("validation needs the training examples; the dataset is empty.")
        self.denoiser, self.points, self.probes = denoiser, points, dict(probes or {})
        images: dict[tuple, _Image] = {}
        for ex in examples:  # build_examples shares one latent storage and one caption dict across an image's rows
            key = (ex.latent.data_ptr(), tuple(ex.latent.shape), id(ex.cond_token))
            img = images.setdefault(key, _Image(ex.latent, ex.cond_token))
            if not any(c is ex.cond_pres for c in img.keep):
                img.keep.append(ex.cond_pres)
        gen = torch.Generator().manual_seed(seed)
        for img in images.values():
            img.t = denoiser.schedule.sample_t(points, gen)
            img.noise = torch.randn((points, *img.latent.shape), generator=gen)
        self.images = list(images.values())
        self._frozen: list[list[Tensor]] | None = None

    def _passes(self, img: _Image, device: torch.device):
        """(x_t, t, target, conditionings without the trigger: the image's own, then the probes) on device."""
        k = self.points
        x0 = img.latent.to(device, torch.float32)[None].expand(k, *img.latent.shape)
        noise, t = img.noise.to(device), img.t.to(device)
        sched = self.denoiser.schedule
        keep = [_rows(c, k, device) for c in img.keep] + [_rows(c, k, device) for c in self.probes.values()]
        return sched.add_noise(x0, noise, t), t, sched.target(x0, noise, t, self.denoiser.prediction_type), keep

    def __call__(self, step: int) -> dict:
        den = self.denoiser
        device = next(den.module.parameters()).device
        with observing(den.module):
            if self._frozen is None:
                with adapter_switched(den.module, False):
                    self._frozen = [[den.predict(x_t, t, c).float().cpu() for c in keep]
                                    for x_t, t, _, keep in (self._passes(img, device) for img in self.images)]
            fit, keep_d, probe_d = [], [], []
            with adapter_switched(den.module, True):
                for img, frozen in zip(self.images, self._frozen):
                    x_t, t, target, keep = self._passes(img, device)
                    fit.append(_sq_diff(den.predict(x_t, t, _rows(img.cond_token, self.points, device)), target).cpu())
                    for j, (c, f) in enumerate(zip(keep, frozen)):
                        d = _sq_diff(den.predict(x_t, t, c).cpu(), f)
                        keep_d.append(d)
                        if j >= len(img.keep):
                            probe_d.append(d)
        row = {"step": int(step), "fit": float(torch.cat(fit).double().mean()),
               "keep_drift": float(torch.cat(keep_d).double().mean())}
        if self.probes:
            row["probe_drift"] = float(torch.cat(probe_d).double().mean())
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
    with Path(path).open(newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def every(n: int, validator: Validator, sink: Callable[[dict], None]) -> Callable:
    """A trainer `callback` that validates after every n-th step and after the last one."""
    if n < 1:
        raise ValueError(f"validate every n steps needs n >= 1, got {n}.")

    def callback(info) -> None:
        if info.step % n == 0 or info.step == info.total:
            sink(validator(info.step))
    return callback
