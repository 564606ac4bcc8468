"""Step time and peak memory of plain LoRA (alpha 0) against CAT (alpha 1), one UNet config, one run.

`--methods` adds APT (cat_train/apt.py) rows: apt:ada (adaptive bins), apt:rs (stabilization),
apt:aa (attention alignment), apt (all three), cat+apt (CAT alpha 1 with all three).

    python benchmarks/step_cost.py --unet sd15 --res 256 --batch 1 --steps 4

Each method runs in its own subprocess so peak memory (CUDA: max allocated; CPU: peak RSS above
the process's RSS after the model is built) belongs to that method alone. The FLOP floor of a CAT
step is 7/3 of a plain one at equal batch: plain = fwd + bwd (~3 forward units); CAT = one frozen
forward (1) + a doubled adapted batch fwd + bwd (6).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cat_train.adapter import LoraSpec  # noqa: E402
from cat_train.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.apt import AptConfig  # noqa: E402
from cat_train.loss import CatLossConfig  # noqa: E402
from cat_train.train import Example, TrainConfig, train  # noqa: E402
from cat_train.world.unet import SD15_CONFIG, SDXL_CONFIG, TINY_CONFIG, UNet  # noqa: E402

CONFIGS = {"sd15": SD15_CONFIG, "sdxl": SDXL_CONFIG, "tiny": TINY_CONFIG}
_APT = dict(adaptive=1.0, stabilize=5.0, align=1000.0)
METHODS = {  # name: (alpha, APT parts switched on)
    "lora": (0.0, ()), "cat": (1.0, ()), "apt:ada": (0.0, ("adaptive",)), "apt:rs": (0.0, ("stabilize",)),
    "apt:aa": (0.0, ("align",)), "apt": (0.0, tuple(_APT)), "cat+apt": (1.0, tuple(_APT)),
}


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
    stamps = []

    def tick(info):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    tcfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, mixed_precision=args.precision,
                       gradient_checkpointing=args.checkpointing, device=args.device)
    alpha, parts = METHODS[args.method] if args.method else (args.alpha, ())
    apt = AptConfig(**{k: v for k, v in _APT.items() if k in parts})
    train(denoiser, examples, CatLossConfig(alpha=alpha, preservation="empty", apt=apt), LoraSpec(rank=args.rank), tcfg,
          callback=tick)
    step_s = (stamps[-1] - stamps[args.warmup - 1]) / args.steps
    out = {"alpha": args.alpha, "step_s": step_s,
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
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=["lora", "cat"])
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
    print(f"UNet {args.unet} ({sum(p.numel() for p in UNet(**CONFIGS[args.unet]).parameters()) if args.unet != 'sd15' else 859520964:,} params), "
          f"{args.res}px, batch {args.batch}, rank {args.rank}, {args.device}, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    names = {"lora": "LoRA (alpha 0)", "cat": "CAT (alpha 1)"}
    print("| method | step s | peak MB | training MB (peak - model) | step / LoRA | peak / LoRA |\n|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {names.get(m, m)} | {r['step_s']:.3f} | {r[mem]:.0f} | {r[mem] - r[base]:.0f} | "
              f"{r['step_s'] / lora['step_s']:.2f} | {r[mem] / lora[mem]:.2f} |")
    if "cat" in rows:
        cat = rows["cat"]
        print(f"CAT / LoRA step time: {cat['step_s'] / lora['step_s']:.2f} (FLOP floor 7/3 = 2.33)")
        print(f"CAT / LoRA peak memory: {cat[mem] / lora[mem]:.2f}; training overhead ratio: "
              f"{(cat[mem] - cat[base]) / max(lora[mem] - lora[base], 1e-9):.2f}")


if __name__ == "__main__":
    main()
