"""The little a trainer needs to know about a diffusion model.

A `Denoiser` is the torch module to adapt, one prediction call, the prediction type and the
noise schedule. ComfyUI's ModelPatcher implements it in `nodes/`; tests and the demo implement it
with `cat_train.world.unet.UNet`. Everything is in DDPM space: `x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps`,
integer timesteps `t in [0, T)`, which is exactly what an SD UNet receives inside ComfyUI too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

PredictionType = Literal["eps", "v"]
Cond = dict[str, Tensor]  # "context": (B, L, C); SDXL adds "y": (B, adm)


class NoiseSchedule:
    """Discrete DDPM schedule; SD's scaled-linear betas by default."""

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.double()

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, steps=1000) -> "NoiseSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator)

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coefs(t, x0)
        return a * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: PredictionType) -> Tensor:
        if prediction_type == "eps":
            return noise
        a, s = self._coefs(t, x0)
        return a * noise - s * x0  # v = sqrt(abar) eps - sqrt(1-abar) x0

    def sigma(self, t: Tensor) -> Tensor:
        """k-diffusion sigma of timestep t (what ComfyUI's model_sampling calls sigma)."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return ((1 - abar) / abar).sqrt()


@runtime_checkable
class Denoiser(Protocol):
    module: nn.Module
    prediction_type: PredictionType
    schedule: NoiseSchedule

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


@dataclass
class ModuleDenoiser:
    """A Denoiser over any module called as `module(x_t, t, context=..., y=...)` (ldm convention)."""

    module: nn.Module
    prediction_type: PredictionType = "eps"
    schedule: NoiseSchedule = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.schedule is None:
            self.schedule = NoiseSchedule.scaled_linear()

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        # a bf16-stored module takes bf16 inputs (targets stay fp32 outside); LoRA parameters are fp32 whatever the base
        dt = next(p.dtype for n, p in self.module.named_parameters() if "lora_" not in n)
        if dt == torch.float32 or not dt.is_floating_point:
            return self.module(x_t, t, **cond)
        return self.module(x_t.to(dt), t, **{k: v.to(dt) for k, v in cond.items()})
