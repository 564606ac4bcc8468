"""DDIM sampling with classifier-free guidance over any `Denoiser` (eps or v prediction).

    eps_hat = eps(x, t, uncond) + cfg * (eps(x, t, cond) - eps(x, t, uncond))
    x0_hat  = (x - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    x_prev  = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat           (eta = 0: deterministic)

Same noise and same timesteps in, same images out: the benchmark pairs images with and without the
trigger by giving both the same starting noise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import Cond, Denoiser


def timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced ('trailing': the first step starts at pure noise)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}.")
    return [round(num_timesteps - 1 - i * (num_timesteps - 1) / max(1, steps - 1)) for i in range(steps)] if steps > 1 else [num_timesteps - 1]


def _expand(c: Cond, n: int) -> Cond:
    return {k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in c.items()}


@torch.no_grad()
def sample(denoiser: Denoiser, cond: Cond, uncond: Cond | None, shape: tuple[int, ...], steps: int = 20, cfg: float = 3.0,
           generator: torch.Generator | None = None, noise: Tensor | None = None, clip_x0: float | None = None) -> Tensor:
    """Latents of shape `shape` (B, C, H, W). cond/uncond are batched (B or 1 rows); uncond=None or cfg=1: no guidance."""
    b = shape[0]
    param = next(denoiser.module.parameters())
    x = noise.to(param) if noise is not None else torch.randn(shape, generator=generator).to(param)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(x.shape)}, expected {tuple(shape)}.")
    cond = {k: v.to(param.device) for k, v in _expand(cond, b).items()}
    guided = uncond is not None and cfg != 1.0
    if guided:
        uncond = {k: v.to(param.device) for k, v in _expand(uncond, b).items()}
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    abar = denoiser.schedule.alphas_cumprod
    ts = timesteps(denoiser.schedule.num_timesteps, steps)
    for i, t in enumerate(ts):
        tt = torch.full((b,), t, dtype=torch.long, device=param.device)
        if guided:
            c, u = denoiser.predict(torch.cat([x, x]), torch.cat([tt, tt]), both).chunk(2)
            out = u + cfg * (c - u)
        else:
            out = denoiser.predict(x, tt, cond)
        a = float(abar[t])
        if denoiser.prediction_type == "v":
            eps, x0 = a**0.5 * out + (1 - a) ** 0.5 * x, a**0.5 * x - (1 - a) ** 0.5 * out
        else:
            eps, x0 = out, (x - (1 - a) ** 0.5 * out) / a**0.5
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x
