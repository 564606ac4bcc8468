"""Where a training step's CPU time goes: torch.profiler over one plain (alpha 0) and one CAT (alpha 1) step.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --unet sd15 --res 256 --rows 15

Same setting as benchmarks/step_cost.py (random-init UNet of the chosen shape, rank 16 LoRA on the default
targets, batch 1, fp32). Each method trains warm-up steps, then the profiled one; the table lists the top
ops by self CPU time (the op's own time, children excluded), and a last line the share of the step spent
in ops whose names are not aten:: (Python-side work: peft layers, hooks, our step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cat_train.adapters.lora import LoraSpec  # noqa: E402
from cat_train.step.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.training import CatLossConfig  # noqa: E402
from cat_train.training import Example, TrainConfig, train  # noqa: E402
from cat_train.world.unet import SD15_CONFIG, TINY_CONFIG, UNet  # noqa: E402

CONFIGS = {"sd15": SD15_CONFIG, "tiny": TINY_CONFIG}


def profile_method(denoiser, examples, alpha: float, warmup: int, rank: int, every: int = 1):
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

    def between_steps(info):  # from the end of the last warm-up step to the end of the profiled one
        (prof.start if info.step == warmup else prof.stop)()
    train(denoiser, examples, CatLossConfig(alpha=alpha, preservation="empty", keep_every=every), LoraSpec(rank=rank),
          TrainConfig(steps=warmup + 1, batch_size=1), callback=between_steps)
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = CONFIGS[args.unet]
    denoiser = ModuleDenoiser(UNet(**cfg))
    lat = args.res // 8
    cond = {"context": torch.randn(77, cfg["context_dim"])}
    examples = [Example(torch.randn(4, lat, lat), cond, {k: v * 0.5 for k, v in cond.items()}) for _ in range(4)]
    print(f"UNet {args.unet}, {args.res} px, batch 1, rank {args.rank}, threads {torch.get_num_threads()}")
    for name, alpha in (("plain LoRA (alpha 0)", 0.0), ("CAT (alpha 1)", 1.0)):
        prof = profile_method(denoiser, examples, alpha, args.warmup, args.rank)
        avg = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in avg)
        other = sum(e.self_cpu_time_total for e in avg if not e.key.startswith("aten::"))
        print(f"\n### {name}: {total / 1e6:.2f} s self CPU in the profiled step\n")
        print("| op | self CPU s | share | calls |\n|---|---|---|---|")
        for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:args.rows]:
            print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / total:.1%} "
                  f"| {e.count} |")
        print(f"\nnot aten:: (Python-side: autograd nodes, peft, hooks, our step): {other / 1e6:.3f} s "
              f"({other / total:.1%})")


if __name__ == "__main__":
    main()
