"""Steps per second of world-model training at 1, 2 and all cores, on this machine as it is and beside a CPU hog.

    python benchmarks/threads.py                 # world model (1.7M params) and a 4x wider one (26M)
    python benchmarks/threads.py --demo          # also the whole demo, with the rule's choice and with 2 threads

Each row runs in its own process (OpenMP reads OMP_NUM_THREADS / OMP_WAIT_POLICY once, when torch loads):
`rule` is the pack's own choice (cat_train/training/threads.py), the others set OMP_NUM_THREADS, with OpenMP's
default waiting or OMP_WAIT_POLICY=PASSIVE. "beside a hog" starts a process doing float32 matrix products on
every core with torch's default settings (as a second training or a CI job would), for the row's whole run.
Ratios are against 1 thread in the same condition, from this one run. The load average is printed before each
condition: "quiet" means quiet only if it is near 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOG = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a = (a @ a).tanh_()\n"

STEP = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import cat_train.__main__ as entry
chosen = entry.threads_before_torch("demo") if {rule!r} else None
import torch
from dataclasses import replace
from cat_train.adapters.lora import LoraSpec
from cat_train.training import TrainConfig, train
from cat_train.world import bench
from cat_train.world.bench import World
w = World()
if {width!r} != 32:  # the same network, wider: a 'mid-size' model with random weights (speed only)
    from cat_train.world.model import CONFIG
    from cat_train.world.unet import UNet
    from cat_train.step.denoiser import ModuleDenoiser
    unet = UNet(**dict(CONFIG, model_channels={width!r})).eval().requires_grad_(False)
    w.den = ModuleDenoiser(unet, w.den.prediction_type, w.den.schedule)
c = bench.BenchConfig(steps={steps!r}, seeds=(0,), methods=("lora", "cat1"))
out = {{"threads": torch.get_num_threads(), "chosen": chosen,
        "params": sum(p.numel() for p in w.den.module.parameters())}}
for m in ("lora", "cat1"):
    ex, lc, bs = bench.examples_for(m, w, c, 0)
    tc = TrainConfig(steps=2, lr=c.lr, seed=0, batch_size=bs)
    train(w.den, ex, lc, LoraSpec(rank=c.rank, alpha=c.rank, preset=c.preset), tc)  # warm-up
    t0 = time.perf_counter()
    train(w.den, ex, lc, LoraSpec(rank=c.rank, alpha=c.rank, preset=c.preset), replace(tc, steps={steps!r}))
    out[m] = {steps!r} / (time.perf_counter() - t0)
print("RESULT " + json.dumps(out))
"""


def run_rows(rows, width: int, steps: int) -> dict[str, dict]:
    res = {}
    for name, env_extra, rule in rows:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                                  "MKL_NUM_THREADS")}
        env.update(env_extra)
        code = STEP.format(root=str(ROOT), rule=rule, width=width, steps=steps)
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(p.stdout[-2000:] + p.stderr[-3000:])
            raise SystemExit(f"row {name} failed")
        res[name] = json.loads(line[7:])
    return res


def table(title: str, res: dict[str, dict]) -> None:
    one = res["1 thread"]
    print(title)
    print(f"  {'row':26s} {'threads':>7s} {'lora steps/s':>13s} {'cat1 steps/s':>13s} {'lora vs 1':>10s} "
          f"{'cat1 vs 1':>10s}")
    for name, r in res.items():
        print(f"  {name:26s} {r['threads']:7d} {r['lora']:13.2f} {r['cat1']:13.2f} {r['lora'] / one['lora']:9.2f}x "
              f"{r['cat1'] / one['cat1']:9.2f}x")


def condition(label: str, rows, width: int, steps: int, hog: bool) -> dict:
    load = os.getloadavg()[0]
    procs = []
    if hog:
        procs = [subprocess.Popen([sys.executable, "-c", HOG], env={k: v for k, v in os.environ.items()
                                                                    if not k.startswith("OMP_")})]
        time.sleep(3)
    try:
        res = run_rows(rows, width, steps)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    params = next(iter(res.values()))["params"]
    table(f"{label}, UNet of {params / 1e6:.1f}M parameters (load average before: {load:.2f})", res)
    return res


def demo_seconds(env_extra: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cat_train", "demo", "--out", out], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 128],
                    help="the UNet's model_channels (32: the world model itself)")
    ap.add_argument("--demo", action="store_true", help="also time the whole demo (quiet: rule vs 2 threads)")
    a = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = sorted({1, 2, cores})
    rows = [("rule (no settings)", {}, True)]
    for n in counts:
        rows.append((f"{n} thread{'s' if n > 1 else ''}" if n > 1 else "1 thread", {"OMP_NUM_THREADS": str(n)},
                     False))
        if n > 1:
            rows.append((f"{n} threads, PASSIVE", {"OMP_NUM_THREADS": str(n), "OMP_WAIT_POLICY": "PASSIVE"}, False))
    print(f"{cores} usable cores; {a.steps} timed steps a row after 2 warm-up steps\n")
    for width in a.widths:
        condition("as the machine is", rows, width, a.steps, hog=False)
        condition("beside a CPU hog (matrix products on every core)", rows, width, a.steps, hog=True)
        print()
    if a.demo:
        load = os.getloadavg()[0]
        rule, two = demo_seconds({}), demo_seconds({"OMP_NUM_THREADS": "2"})
        print(f"whole demo (load average before: {load:.2f}): rule {rule:.0f} s, 2 threads {two:.0f} s "
              f"(2 threads / rule {two / rule:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
