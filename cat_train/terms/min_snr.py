"""min-SNR-γ: a per-timestep weight of the fit term, plugged in as a `plugs.LossTerm` (its `fit_weight`).

Hang et al. 2023 weight the x0-space loss by min(SNR, γ): the easy low-noise steps stop dominating the gradient. In
the space a model is trained in that is (kohya's apply_snr_weight, diffusers' compute_snr, OneTrainer):
    eps:  min(SNR, γ) / SNR          SNR = abar / (1 - abar)
    v:    min(SNR, γ) / (SNR + 1)
and for flow models (x_t = (1-σ) x0 + σ eps, target eps - x0), where OneTrainer offers no min-SNR and kohya's SD3/Flux
scripts none either, the same x0-space weight carried to the velocity: x0 = x_t - σ·v, so an x0 error is σ times the
velocity error and the weight is min(SNR, γ)·σ² with SNR = ((1-σ)/σ)². Like the v form it is α²-ish at high noise
((1-σ)² there, abar for v) and γσ² at low noise (γ(1-abar) for v), so it lowers the fit term's scale at every t.

Only the fit term is weighted: the keep term compares two predictions of the same model at the same t, and the CAT
factor α sets its scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..step.denoiser import Denoiser, FlowSchedule, NoiseSchedule, PredictionType
from ..step.plugs import LossTerm


def snr(schedule: NoiseSchedule | FlowSchedule, t: Tensor) -> Tensor:
    """Signal-to-noise ratio (alpha_t / sigma_t)² of timestep t, float64."""
    if isinstance(schedule, FlowSchedule):
        s = schedule.sigma(t.cpu())
        return ((1 - s) / s) ** 2
    abar = schedule.alphas_cumprod[t.cpu().long()]
    return abar / (1 - abar)


def min_snr_weight(schedule: NoiseSchedule | FlowSchedule, prediction_type: PredictionType, t: Tensor,
                   gamma: float) -> Tensor:
    """Per-sample fit weight of timesteps t (float64, on the CPU)."""
    ratio = snr(schedule, t)
    capped = ratio.clamp(max=gamma)
    if prediction_type == "eps":
        return capped / ratio
    if prediction_type == "v":
        return capped / (ratio + 1)
    if prediction_type == "flow":
        return capped * schedule.sigma(t.cpu()) ** 2
    raise ValueError(f"min_snr_gamma knows eps, v and flow predictions, not {prediction_type!r}; set min_snr_gamma to "
                     "0.")


@dataclass(frozen=True)
class MinSnr:
    """`CatLossConfig.min_snr_gamma` as the terms registry sees it (CatLossConfig.min_snr)."""
    gamma: float = 0.0

    def __post_init__(self):
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError("min_snr_gamma must be a finite number >= 0 (0 = off; 5 is the usual value), got "
                             f"{self.gamma}.")

    @property
    def active(self) -> bool:
        return self.gamma > 0

    def metadata(self, history=()) -> dict[str, str]:
        return {"ss_min_snr_gamma": f"{self.gamma:g}" if self.gamma > 0 else "None"}  # kohya writes None when off

    def build(self, denoiser: Denoiser, adapter=None) -> "MinSnrWeight":
        return MinSnrWeight(denoiser, self.gamma)


class MinSnrWeight(LossTerm):
    """Stateless: a checkpoint holds an empty entry under its name."""

    name = "min_snr_gamma"

    def __init__(self, denoiser: Denoiser, gamma: float):
        self.schedule, self.prediction_type, self.gamma = denoiser.schedule, denoiser.prediction_type, float(gamma)
        min_snr_weight(self.schedule, self.prediction_type, torch.tensor([self.schedule.num_timesteps // 2]),
                       self.gamma)

    def fit_weight(self, t: Tensor) -> Tensor:
        return min_snr_weight(self.schedule, self.prediction_type, t, self.gamma).to(t.device, torch.float32)
