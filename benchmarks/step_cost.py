"""Step time and peak memory of plain LoRA (alpha 0) against CAT (alpha 1), one UNet config, one run.

`--methods` adds APT (cat_train/terms/apt.py) rows: apt:ada (adaptive bins), apt:rs (stabilization),
apt:aa (attention alignment), apt (all three), cat+apt (CAT alpha 1 with all three), and cheaper
preservation rows (CatLossConfig.keep_every / keep_fraction): cat/k<N> (the CAT term every N-th step),
cat/p<F> (on a fraction F of the rows; at batch 1, of the steps). Their step time is the mean over the
cycle: a cat/k<N> row times whole cycles (N steps, one with the term); a cat/p<F> row weighs the mean
of the timed steps with and without the term by the chance of each. The last line names the cheapest
preservation option against the plain step.

    python benchmarks/step_cost.py --unet sd15 --res 256 --batch 1 --steps 4

Each method runs in its own subprocess so peak memory (CUDA: max allocated; CPU: peak RSS above
the process's RSS after the model is built) belongs to that method alone. The FLOP floor of a CAT
step is 7/3 of a plain one at equal batch: plain = fwd + bwd (~3 forward units); CAT = one frozen
forward (1) + a doubled adapted batch fwd + bwd (6).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cat_train.adapters.lora import LoraSpec  # noqa: E402
from cat_train.step.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.terms.apt_config import AptConfig  # noqa: E402
from cat_train.training import CatLossConfig  # noqa: E402
from cat_train.training import Example, TrainConfig, train  # noqa: E402
from cat_train.world.unet import SD15_CONFIG, SDXL_CONFIG, TINY_CONFIG, UNet  # noqa: E402

CONFIGS = {"sd15": SD15_CONFIG, "sdxl": SDXL_CONFIG, "tiny": TINY_CONFIG}
_APT = dict(adaptive=1.0, stabilize=5.0, align=1000.0)
METHODS = {  # name: (alpha, APT parts switched on)
    "lora": (0.0, ()), "cat": (1.0, ()), "apt:ada": (0.0, ("adaptive",)), "apt:rs": (0.0, ("stabilize",)),
    "apt:aa": (0.0, ("align",)), "apt": (0.0, tuple(_APT)), "cat+apt": (1.0, tuple(_APT)),
    "cat/k2": (1.0, ()), "cat/k4": (1.0, ()), "cat/k5": (1.0, ()), "cat/p0.5": (1.0, ()), "cat/p0.25": (1.0, ()),
}


def keep_options(method: str | None) -> tuple[int, float]:
    """'cat/k4' -> (4, 1.0); 'cat/p0.5' -> (1, 0.5): keep_every and keep_fraction of a method (1, 1 = exact CAT)."""
    opt = (method or "").partition("/")[2]
    return (int(opt[1:]), 1.0) if opt.startswith("k") else (1, float(opt[1:])) if opt.startswith("p") else (1, 1.0)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = CONFIGS[args.unet]
    with torch.device(device):
        unet = UNet(**cfg)
    denoiser = ModuleDenoiser(unet)
    lat = args.res // 8
    ctx = torch.randn(77, cfg["context_dim"])
    cond = {"context": ctx} | ({"y": torch.randn(cfg["adm_in_channels"])} if cfg.get("adm_in_channels") else {})
    examples = [Example(torch.randn(4, lat, lat), cond, {k: v * 0.5 for k, v in cond.items()}) for _ in range(4)]
    base_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    stamps, frozen, predict = [], [0], denoiser.predict

    def counted(*a):  # a forward without grad is the frozen pass: the step had the CAT term
        frozen[-1] += not torch.is_grad_enabled()
        return predict(*a)
    denoiser.predict = counted

    every, fraction = keep_options(args.method)
    # whole cycles: after the warm-up step (which has the term), every-1 without, 1 with
    timed = -(-args.steps // every) * every
    # a keep_fraction run goes on (at most this many steps) until both kinds were timed
    extra = 12 if fraction < 1 else 0

    class Enough(Exception):
        pass

    def tick(info):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        frozen.append(0)
        kinds = {bool(f) for f in frozen[args.warmup:-1]}
        if extra and info.step >= args.warmup + timed and len(kinds) == 2:
            raise Enough

    tcfg = TrainConfig(steps=args.warmup + timed + extra, batch_size=args.batch, mixed_precision=args.precision,
                       gradient_checkpointing=args.checkpointing, device=args.device)
    alpha, parts = METHODS[args.method] if args.method else (args.alpha, ())
    apt = AptConfig(**{k: v for k, v in _APT.items() if k in parts})
    with contextlib.suppress(Enough):
        train(denoiser, examples, CatLossConfig(alpha=alpha, preservation="empty", apt=apt, keep_every=every,
                                                keep_fraction=fraction), LoraSpec(rank=args.rank), tcfg, callback=tick)
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    with_term = [dt for dt, f in zip(times, frozen[args.warmup:]) if f]
    without = [dt for dt, f in zip(times, frozen[args.warmup:]) if not f]
    step_s = sum(times) / len(times)
    chance = 1 - (1 - fraction) ** args.batch  # of a step having the term on at least one row
    mean = lambda xs: sum(xs) / len(xs)
    in_run = None  # the cycle's cost over its own plain steps, both timed in this run, interleaved (ABAB)
    if with_term and without:
        ratio = mean(with_term) / mean(without)
        in_run = (ratio + every - 1) / every if fraction == 1 else chance * ratio + 1 - chance
        if fraction < 1:  # the expected step, not the mean of whichever steps were drawn
            step_s = chance * mean(with_term) + (1 - chance) * mean(without)
    elif fraction < 1:
        step_s = float("nan")  # not both kinds timed: no estimate
    out = {"alpha": args.alpha, "step_s": step_s, "steps_with_term": len(with_term), "steps_timed": len(times),
           "in_run": in_run,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss}
    if device.type == "cuda":
        out |= {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20, "base_cuda_mb": base_cuda}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--res", type=int, default=256, help="image resolution in px (latent = res / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["lora", "cat", "cat/k2", "cat/k4",
            "cat/p0.5"])
    ap.add_argument("--alpha", type=float, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.alpha is not None or args.method is not None:
        print(json.dumps(measure(args)))
        return
    rows = {}
    for m in dict.fromkeys(["lora", *args.methods]):  # each in its own process: peak memory is per method
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", m]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{m} failed:\n{res.stderr[-3000:]}")
        rows[m] = json.loads(res.stdout.strip().splitlines()[-1])
    lora = rows["lora"]
    mem = "peak_cuda_mb" if "peak_cuda_mb" in lora else "peak_rss_mb"
    base = "base_cuda_mb" if mem == "peak_cuda_mb" else "base_rss_mb"
    print(f"UNet {args.unet} "
          f"({sum(p.numel() for p in UNet(**CONFIGS[args.unet]).parameters()) if args.unet != 'sd15' else 859520964:,} "
          f"params), {args.res}px, batch {args.batch}, rank {args.rank}, {args.device}, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    names = {"lora": "LoRA (alpha 0)", "cat": "CAT (alpha 1)",
             **{m: f"CAT (alpha 1), {option_name(m)}" for m in METHODS if "/" in m}}
    print("| method | step s | peak MB | training MB (peak - model) | step / LoRA | peak / LoRA | timed steps with the "
          "term | step / its own plain steps (same run) |\n|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        own = f"{r['in_run']:.2f}" if r.get("in_run") else "-"
        print(f"| {names.get(m, m)} | {r['step_s']:.3f} | {r[mem]:.0f} | {r[mem] - r[base]:.0f} | "
              f"{r['step_s'] / lora['step_s']:.2f} | {r[mem] / lora[mem]:.2f} | "
              f"{r['steps_with_term']}/{r['steps_timed']} | {own} |")
    if "cat" in rows:
        cat = rows["cat"]
        print(f"CAT / LoRA step time: {cat['step_s'] / lora['step_s']:.2f} (FLOP floor 7/3 = 2.33)")
        print(f"CAT / LoRA peak memory: {cat[mem] / lora[mem]:.2f}; training overhead ratio: "
              f"{(cat[mem] - cat[base]) / max(lora[mem] - lora[base], 1e-9):.2f}")
    # A cheaper option's ratio is measured against the plain steps of its own run, interleaved with its CAT steps: on a
    # machine other jobs share, two runs minutes apart differ by more than the options do. Exact CAT: against the LoRA
    # run.
    ratios = {m: (r["in_run"] if r.get("in_run") else r["step_s"] / lora["step_s"]) for m, r in rows.items()
              if m == "cat" or m.startswith("cat/")}
    ratios = {m: v for m, v in ratios.items() if v == v}  # a keep_fraction run that timed one kind only has none
    if ratios:
        best = min(ratios, key=ratios.get)
        print(f"cheapest preservation step / plain step: {ratios[best]:.2f}x ({option_name(best)})")


def option_name(m: str) -> str:
    every, fraction = keep_options(m)
    parts = [f"keep_every {every}"] * (every > 1) + [f"keep_fraction {fraction:g}"] * (fraction < 1)
    return ", ".join(parts) or "exact CAT"


if __name__ == "__main__":
    main()
