"""The little a trainer needs to know about a diffusion model.

A `Denoiser` is the torch module to adapt, one prediction call, the prediction type and the
noise schedule. ComfyUI's ModelPatcher implements it in `nodes/`; tests and the demo implement it
with `cat_train.world.unet.UNet`. UNets (SD1.x/SDXL) are in DDPM space: `x_t = sqrt(abar_t) x_0 + sqrt(1-abar_t) eps`,
integer timesteps
`t in [0, T)`, which is exactly what an SD UNet receives inside ComfyUI too. Flow-matching transformers
(SD3, Flux) use `FlowSchedule`: `x_t = (1 - sigma) x_0 + sigma eps`, target the velocity `eps - x_0`
(prediction type "flow"), with the same `sample_t / add_noise / target` interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

PredictionType = Literal["eps", "v", "flow"]
Cond = dict[str, Tensor]  # "context": (B, L, C); SDXL/SD3/Flux add "y": (B, adm); Flux may add "guidance": (B,)


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

    def sample_t(self, n: int, generator: torch.Generator | None = None, t_min: int = 0,
                 t_max: int | None = None) -> Tensor:
        """Integer timesteps uniform in [t_min, t_max) (kohya's min_timestep/max_timestep); the full range draws as
        this always did, one randint over [0, T)."""
        return torch.randint(t_min, self.num_timesteps if t_max is None else t_max, (n,), generator=generator)

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


def time_shift(shift: float, u: Tensor) -> Tensor:
    """sigma = shift*u / (1 + (shift-1)*u): SD3's resolution shift (Esser et al. 2024, eq. 23). Flux's
    exp(mu)/(exp(mu) + 1/u - 1) is the same map with shift = exp(mu)."""
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


class FlowSchedule:
    """Rectified flow as SD3 and Flux are trained: `x_t = (1 - sigma) x_0 + sigma eps`, target `eps - x_0`.

    The trainer's "t" is the continuous timestep `1000 * sigma` (`num_timesteps` = 1000), so code written for
    integer DDPM timesteps (APT's per-bin indicator, the memory probe's mid timestep) reads it unchanged.

    sigma is drawn as the families are trained (options and defaults):
      sampling "logit_normal" (default): u = sigmoid(N(logit_mean, logit_std)), mean 0, std 1: SD3's
               rf/lognorm(0, 1), the paper's best (Esser et al. 2024, sec. 3.1; also diffusers' SD3/Flux scripts);
               "uniform": u ~ U(0, 1).
      shift    (default 1 = none): sigma = time_shift(shift, u), which moves steps toward noise for large images.
               The ComfyUI trainer passes the MODEL's own sampling shift (SD3: 3.0; Flux: exp(1.15) = 3.16, the
               value kohya's `--timestep_sampling shift --discrete_flow_shift 3.1582` uses), so training sees the
               noise levels the model is sampled at, including a ModelSampling node's shift upstream.
    sigma is kept in [sigma_min, 1 - sigma_min] so neither end is a pure image or pure noise.
    """

    def __init__(self, shift: float = 1.0, sampling: Literal["logit_normal", "uniform"] = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, sigma_min: float = 1e-4):
        if not shift > 0:
            raise ValueError(f"flow shift must be > 0 (1 = no shift; SD3 uses 3.0), got {shift}.")
        if sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"flow timestep sampling must be 'logit_normal' or 'uniform', got {sampling!r}.")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0 (SD3 uses 1.0), got {logit_std}.")
        self.shift, self.sampling = float(shift), sampling
        self.logit_mean, self.logit_std, self.sigma_min = float(logit_mean), float(logit_std), float(sigma_min)

    num_timesteps = 1000

    def __repr__(self) -> str:
        return (f"FlowSchedule(shift={self.shift:g}, sampling={self.sampling!r}, logit_mean={self.logit_mean:g}, "
                f"logit_std={self.logit_std:g})")

    def sigma(self, t: Tensor) -> Tensor:
        return t.double() / self.num_timesteps

    def sample_t(self, n: int, generator: torch.Generator | None = None, t_min: int = 0,
                 t_max: int | None = None) -> Tensor:
        """t_min/t_max (out of 1000): the drawn sigma is mapped linearly into [t_min, t_max] / 1000, keeping the
        distribution's shape (kohya's SD3/Flux scripts: `t * (t_max - t_min) + t_min`); the full range leaves it as is,
        so the draws stay those of every earlier run."""
        if self.sampling == "logit_normal":
            z = torch.randn(n, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(self.logit_mean + self.logit_std * z)
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        s = time_shift(self.shift, u)
        lo, hi = t_min / self.num_timesteps, (self.num_timesteps if t_max is None else t_max) / self.num_timesteps
        if (lo, hi) != (0.0, 1.0):
            s = lo + (hi - lo) * s
        s = s.clamp(self.sigma_min, 1 - self.sigma_min)
        return (s * self.num_timesteps).float()

    def _sigma_like(self, t: Tensor, like: Tensor) -> Tensor:
        return self.sigma(t).to(like.dtype).view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = self._sigma_like(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: PredictionType = "flow") -> Tensor:
        if prediction_type != "flow":
            raise ValueError(f"a flow schedule trains velocity predictions ('flow'), not {prediction_type!r}; "
                             "eps/v models use NoiseSchedule.")
        return noise - x0


@runtime_checkable
class Denoiser(Protocol):
    module: nn.Module
    prediction_type: PredictionType
    schedule: NoiseSchedule | FlowSchedule

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
