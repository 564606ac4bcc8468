"""Pretrain the world's base model from the seed: `python -m cat_train.world.pretrain [--steps N] [--out PATH]`.

UNet and text encoder learn together on freshly drawn world images (eps prediction, SD's schedule),
10% empty captions so classifier-free guidance works; the saved weights are an EMA of the trained ones.
One CPU thread, so it can run beside other work; ~15 minutes for the default steps.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from safetensors.torch import save_file

from ..denoiser import NoiseSchedule
from . import model as wm
from .generator import training_batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train.world.pretrain")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop", type=int, default=0, help="end after this many steps (the schedule still spans --steps)")
    ap.add_argument("--out", default=str(wm.BASE_WEIGHTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng, gen = np.random.default_rng(a.seed), torch.Generator().manual_seed(a.seed)
    unet, text = wm.build()
    ema = copy.deepcopy(torch.nn.ModuleDict({"unet": unet, "text": text})).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / a.steps)))
    ns = NoiseSchedule.scaled_linear()
    t0, run = time.time(), 0.0
    last = a.stop or a.steps
    for step in range(1, last + 1):
        imgs, caps, _ = training_batch(rng, a.batch)
        x0 = wm.encode(torch.from_numpy(imgs))
        t = ns.sample_t(a.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = (unet(ns.add_noise(x0, noise, t), t, **text.encode(caps)) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(0.999, (1 + step) / (10 + step))  # EMA warms up so early steps do not dominate
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), params):
                pe.lerp_(p, 1 - d)
        lv = float(loss.detach())
        run = 0.98 * run + 0.02 * lv if step > 1 else lv
        if step % 50 == 0 or step == a.steps:
            print(f"step {step}/{a.steps} loss {run:.4f} {time.time() - t0:.0f}s", flush=True)
        if step % 400 == 0 or step == last:
            save_file({k: v.detach().contiguous().clone() for k, v in ema.state_dict().items()}, a.out,
                      metadata={"steps": str(step), "schedule_steps": str(a.steps), "seed": str(a.seed), "batch": str(a.batch)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
