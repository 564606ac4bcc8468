"""Pretrain the world's base model from the seed: `python -m cat_train.world.pretrain [--steps N] [--out PATH]`.

UNet and text encoder learn together on freshly drawn world images (v prediction, SD's schedule,
Min-SNR-5 loss weights), 10% empty captions so classifier-free guidance works; the saved weights are
an EMA of the trained ones. The committed `base.safetensors` is this script's defaults with
`--threads 1` (21 min beside a second run); with the defaults (2 threads) it took 13.6 min.
Thread counts round differently, so the bytes differ; that regeneration drew the prompted class
29/30 and colour 25/25 (committed: 30/30, 25/25).

Why v and Min-SNR: an eps-predicting model of this size drew noise from pure noise (shape accuracy at
chance, 0.24) because at t=999 its x0 error is amplified 1/sqrt(abar) ~ 15x; v prediction bounds x0
there. At 2000 steps, v with uniform weights still drew chance shapes (class_acc 0.20), v with
Min-SNR-5 0.43; at 4000 steps, v with Min-SNR-5 draws the prompted class and colour (1.0 / 1.0).
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from safetensors.torch import save_file

from ..step.denoiser import NoiseSchedule
from . import model as wm
from .generator import training_batch


def min_snr_weight(ns: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """min(SNR, gamma) expressed in the prediction's own loss: / SNR for eps, / (SNR + 1) for v."""
    abar = ns.alphas_cumprod[t]
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr + 1 if prediction == "v" else snr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train.world.pretrain")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop", type=int, default=0, help="end after this many steps (the schedule still spans --steps)")
    ap.add_argument("--prediction", choices=["v", "eps"], default="v",
                    help="v: x0 stays bounded at the noisiest step, which eps at SD's schedule gets badly wrong at "
                         "this size")
    ap.add_argument("--min-snr", type=float, default=5.0,
                    help="Min-SNR-gamma loss weight (Hang et al. 2023); 0 = uniform. Puts the steps on the noisy "
                         "timesteps that decide shape")
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt,
                                              lambda s: min(1,
                                                            (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / a.steps)))
    ns = NoiseSchedule.scaled_linear()
    t0, run = time.time(), 0.0
    last = a.stop or a.steps
    for step in range(1, last + 1):
        imgs, caps, _ = training_batch(rng, a.batch)
        x0 = wm.encode(torch.from_numpy(imgs))
        t = ns.sample_t(a.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        target = ns.target(x0, noise, t, a.prediction)
        err = (unet(ns.add_noise(x0, noise, t), t, **text.encode(caps)) - target).pow(2).mean((1, 2, 3))
        loss = (err * min_snr_weight(ns, t, a.min_snr, a.prediction)).mean() if a.min_snr > 0 else err.mean()
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
                      metadata={"steps": str(step), "schedule_steps": str(a.steps), "seed": str(a.seed),
                                "batch": str(a.batch),
                                "prediction": a.prediction, "min_snr": str(a.min_snr)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
