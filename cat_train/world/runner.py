"""The benchmarks' one runner: per seed, fixed noise per prompt kind, the base model's images, then each method
trained and sampled on the same noise, and every image set scored. `bench kps` and `bench masked` differ in their
task, methods and scores, which they pass in; the loop over seeds and methods is this one."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

Images = dict[str, torch.Tensor]


def noise(n: int, seed: int) -> torch.Tensor:
    from . import model as wm

    return torch.randn((n, *wm.LATENT_SHAPE), generator=torch.Generator().manual_seed(10_000 + seed))


def run_seeds(world, c, methods, prompts: dict[str, list[str]], score: Callable[[Images, Images], dict],
              train_method: Callable[[str, int, Images, Images], tuple[Images, object, dict]],
              label: Callable[[str], str], log=print, noise_offset: int = 0, base_row: dict | None = None,
              note: Callable[[object], str] = lambda tr: "") -> tuple[dict[str, list[dict]], dict, dict]:
    """train_method(method, seed, noise, base) -> (its images on `noise`, its TrainResult, extra row entries);
    score(images, base images) -> the row. Returns each method's rows (one per seed), the first seed's images and
    TrainResults. Rows of trained methods get `final_fit`, the mean fit of the last 20 steps."""
    results: dict[str, list[dict]] = {m: [] for m in ("base", *methods)}
    grid: dict[str, Images] = {}
    trained: dict[str, object] = {}  # first seed's TrainResult per method: its weights and loss history
    for seed in c.seeds:
        fixed = {k: noise(len(v), noise_offset + seed * 7 + i) for i, (k, v) in enumerate(prompts.items())}
        base = {k: world.generate(prompts[k], fixed[k], c) for k in prompts}
        results["base"].append({**score(base, base), **(base_row or {})})
        if seed == c.seeds[0]:
            grid["base"] = base
        for m in methods:
            t1 = time.time()
            imgs, tr, extra = train_method(m, seed, fixed, base)
            r = {**score(imgs, base), "final_fit": float(np.mean([h["fit"] for h in tr.history[-20:]])), **extra}
            results[m].append(r)
            if seed == c.seeds[0]:
                grid[m], trained[m] = imgs, tr
            log(f"seed {seed} {label(m)} " + " ".join(f"{k} {v:.3f}" for k, v in r.items())
                + f"  ({time.time() - t1:.0f}s)" + note(tr))
    return results, grid, trained


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per method and score: mean, std and the runs over seeds."""
    return {m: {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs])),
                    "runs": [r[k] for r in rs]} for k in rs[0]} for m, rs in results.items()}
