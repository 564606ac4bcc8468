"""Deterministic sampling with classifier-free guidance over any `Denoiser`, in its own prediction space.

Every step turns the guided prediction into (eps_hat, x0_hat) and re-noises x0_hat to the next noise level
with eps_hat, which is DDIM (eta = 0) on a DDPM schedule and Euler on a rectified-flow one:

    out     = pred(x, t, uncond) + cfg * (pred(x, t, cond) - pred(x, t, uncond))
    eps: eps_hat = out,                       x0_hat = (x - sqrt(1 - abar) eps_hat) / sqrt(abar)
    v:   eps_hat = sqrt(abar) out + sqrt(1 - abar) x,   x0_hat = sqrt(abar) x - sqrt(1 - abar) out
    flow (out = eps - x0):  x0_hat = x - sigma out,     eps_hat = x + (1 - sigma) out
    x_next  = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps_hat        (DDPM)
            = (1 - sigma_next) x0_hat + sigma_next eps_hat                (flow: x + (sigma_next - sigma) out)

Same noise and same timesteps in, same images out: the benchmark and the training previews pair images
with and without the trigger by giving both the same starting noise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..step.cancel import cancel_point
from ..step.conds import cat_cond
from ..step.denoiser import Cond, Denoiser, FlowSchedule, time_shift


def timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced ('trailing': the first step starts at pure noise)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}.")
    if steps == 1:
        return [num_timesteps - 1]
    return [round(num_timesteps - 1 - i * (num_timesteps - 1) / (steps - 1)) for i in range(steps)]


def flow_sigmas(schedule: FlowSchedule, steps: int) -> list[float]:
    """`steps` + 1 noise levels from 1 to 0, even in u and moved by the schedule's shift as the model is sampled."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return [float(s) for s in time_shift(schedule.shift, u)]


def _expand(c: Cond, n: int) -> Cond:
    return {k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in c.items()}


def _levels(denoiser: Denoiser, steps: int) -> tuple[list[Tensor], list[tuple[float, float]]]:
    """Model timesteps, and per step (signal, noise) coefficients of its own level and of the next one."""
    sched = denoiser.schedule
    if isinstance(sched, FlowSchedule):
        if denoiser.prediction_type != "flow":
            raise ValueError(f"a flow schedule samples velocity predictions ('flow'), not "
                             f"{denoiser.prediction_type!r}.")
        sig = flow_sigmas(sched, steps)
        return [torch.tensor(s * sched.num_timesteps, dtype=torch.float32) for s in sig[:-1]], [(1 - s, s) for s in sig]
    ts = timesteps(sched.num_timesteps, steps)
    abar = [float(sched.alphas_cumprod[t]) for t in ts] + [1.0]
    return [torch.tensor(t) for t in ts], [(a**0.5, (1 - a) ** 0.5) for a in abar]


def _eps_x0(prediction_type: str, out: Tensor, x: Tensor, a: float, s: float) -> tuple[Tensor, Tensor]:
    if prediction_type == "flow":
        return x + (1 - s) * out, x - s * out
    if prediction_type == "v":
        return a * out + s * x, a * x - s * out
    return out, (x - s * out) / a


@torch.no_grad()
def sample(denoiser: Denoiser, cond: Cond, uncond: Cond | None, shape: tuple[int, ...], steps: int = 20,
           cfg: float = 3.0,
           generator: torch.Generator | None = None, noise: Tensor | None = None,
           clip_x0: float | None = None) -> Tensor:
    """Latents of shape `shape` (B, C, H, W). cond/uncond are batched (B or 1 rows); uncond=None or cfg=1: no
    guidance."""
    b = shape[0]
    param = next(denoiser.module.parameters())
    x = noise.to(param) if noise is not None else torch.randn(shape, generator=generator).to(param)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    cond = {k: v.to(param.device) for k, v in _expand(cond, b).items()}
    guided = uncond is not None and cfg != 1.0
    if guided:
        uncond = {k: v.to(param.device) for k, v in _expand(uncond, b).items()}
        both = cat_cond(cond, uncond)  # texts of different lengths brought to one as the family batches them
    ts, coefs = _levels(denoiser, steps)
    for i, t in enumerate(ts):
        cancel_point()  # a host's Cancel within one sampling step, not after a preview round
        tt = t.to(param.device).repeat(b)
        if guided:
            c, u = denoiser.predict(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
            out = u + cfg * (c - u)
        else:
            out = denoiser.predict(x, tt, cond)
        (a, s), (a_next, s_next) = coefs[i], coefs[i + 1]
        eps, x0 = _eps_x0(denoiser.prediction_type, out, x, a, s)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            if s > 0:
                eps = (x - a * x0) / s
        x = a_next * x0 + s_next * eps
    return x
