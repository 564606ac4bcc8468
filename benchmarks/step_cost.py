"""Step time and peak memory of plain LoRA (alpha 0) against CAT (alpha 1), one UNet config, one run.

`--methods` adds APT (cat_train/terms/apt.py) rows: apt:ada (adaptive bins), apt:rs (stabilization),
apt:aa (attention alignment), apt (all three), cat+apt (CAT alpha 1 with all three), and cheaper
preservation rows (CatLossConfig.keep_every / keep_fraction): cat/k<N> (the CAT term every N-th step),
cat/p<F> (on a fraction F of the rows; at batch 1, of the steps). Their step time is the mean over the
cycle: a cat/k<N> row times whole cycles (N steps, one with the term); a cat/p<F> row weighs the mean
of the timed steps with and without the term by the chance of each. cat/local rows use the layer-local keep
estimator (CatLossConfig.keep_estimator "local", cat_train/terms/keep_local.py), alone or thinned (cat/local/k2,
cat/local/p0.5), and report its recorded inputs (MB). Every method's runs are also alternated with plain LoRA runs
in one process (`--rounds`). The last line names the cheapest preservation option against the plain step, counting
only options that kept the identity on the world (KEEPS_IDENTITY, docs/world-bench.md).

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
    "cat/local": (1.0, ()), "cat/local/k2": (1.0, ()), "cat/local/p0.5": (1.0, ()),
}
# Whether each preservation option keeps the identity on the world benchmark (docs/world-bench.md, `bench kps`, seeds
# 0-2, α 1 and the options as named here): only those count for the cheapest-option line. keep_every 2 and 4 and
# keep_fraction 0.25 lost it (IS 0.22, 0.00, 0.13 against CAT's 0.61); keep_fraction 0.5 kept it (IS 0.68). The local
# keep estimator (unit weights) drew it in 1.00 / 0.94 / 0.92 of the trigger images (alone / every other step / half the
# rows; kept: >= 0.9), with noisier trigger images than exact CAT's (IS 0.27 / 0.18 / 0.42).
KEEPS_IDENTITY = {"cat": True, "cat/k2": False, "cat/k4": False, "cat/k5": False, "cat/p0.5": True, "cat/p0.25": False,
                  "cat/local": True, "cat/local/k2": True, "cat/local/p0.5": True}


def keep_options(method: str | None) -> tuple[int, float]:
    """'cat/k4' -> (4, 1.0); 'cat/p0.5' -> (1, 0.5): keep_every and keep_fraction of a method (1, 1 = exact CAT)."""
    every, fraction = 1, 1.0
    for opt in (method or "").split("/")[1:]:
        if opt[:1] == "k":
            every = int(opt[1:])
        elif opt[:1] == "p":
            fraction = float(opt[1:])
    return every, fraction


def estimator(method: str | None) -> str:
    """'cat/local/k2' -> 'local': the keep estimator of a method (CatLossConfig.keep_estimator)."""
    return "local" if "local" in (method or "").split("/")[1:] else "exact"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(args):
    """The model (random weights from seed 0), four examples, and a counter of frozen passes per step."""
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
    frozen, predict = [0], denoiser.predict

    def counted(*a):  # a forward without grad is the frozen pass: the step had the CAT term
        frozen[-1] += not torch.is_grad_enabled()
        return predict(*a)
    denoiser.predict = counted
    return denoiser, examples, frozen


def run_steps(denoiser, examples, frozen, method, args, recorded: list | None = None) -> list[tuple[float, bool]]:
    """One training run of `method`: (seconds, had the CAT term) of each step after the warm-up ones; `recorded` gets
    the local keep estimator's recorded inputs (MB) of each step that had it."""
    device = torch.device(args.device)
    every, fraction = keep_options(method)
    # whole cycles: after the warm-up step (which has the term), every-1 without, 1 with
    timed = -(-args.steps // every) * every
    # a keep_fraction run goes on (at most this many steps) until both kinds were timed
    extra = 12 if fraction < 1 else 0
    stamps = []
    frozen[:] = [0]

    class Enough(Exception):
        pass

    def tick(info):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        frozen.append(0)
        if recorded is not None and info.reports.get("keep_local"):
            recorded.append(info.reports["keep_local"]["recorded_mb"])
        kinds = {bool(f) for f in frozen[args.warmup:-1]}
        if extra and info.step >= args.warmup + timed and len(kinds) == 2:
            raise Enough

    tcfg = TrainConfig(steps=args.warmup + timed + extra, batch_size=args.batch, mixed_precision=args.precision,
                       gradient_checkpointing=args.checkpointing, device=args.device)
    alpha, parts = METHODS[method] if method else (args.alpha, ())
    apt = AptConfig(**{k: v for k, v in _APT.items() if k in parts})
    with contextlib.suppress(Enough):
        train(denoiser, examples, CatLossConfig(alpha=alpha, preservation="empty", apt=apt, keep_every=every,
                                                keep_fraction=fraction, keep_estimator=estimator(method)),
              LoraSpec(rank=args.rank, preset=args.preset), tcfg, callback=tick)
    times = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    return [(dt, bool(f)) for dt, f in zip(times, frozen[args.warmup:])]


def step_estimate(steps: list[tuple[float, bool]], method, batch: int) -> dict:
    """The method's mean step (a keep_fraction run: the expected one) and its cost over its own plain steps."""
    every, fraction = keep_options(method)
    times = [dt for dt, _ in steps]
    with_term = [dt for dt, f in steps if f]
    without = [dt for dt, f in steps if not f]
    step_s = sum(times) / len(times)
    chance = 1 - (1 - fraction) ** batch  # of a step having the term on at least one row
    mean = lambda xs: sum(xs) / len(xs)
    in_run = None  # the cycle's cost over its own plain steps, both timed in this run, interleaved (ABAB)
    if with_term and without:
        ratio = mean(with_term) / mean(without)
        in_run = (ratio + every - 1) / every if fraction == 1 else chance * ratio + 1 - chance
        if fraction < 1:  # the expected step, not the mean of whichever steps were drawn
            step_s = chance * mean(with_term) + (1 - chance) * mean(without)
    elif fraction < 1:
        step_s = float("nan")  # not both kinds timed: no estimate
    return {"step_s": step_s, "steps_with_term": len(with_term), "steps_timed": len(times), "in_run": in_run}


def measure(args) -> dict:
    device = torch.device(args.device)
    denoiser, examples, frozen = setup(args)
    base_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20
    recorded: list[float] = []
    steps = run_steps(denoiser, examples, frozen, args.method, args, recorded)
    out = {"alpha": args.alpha, **step_estimate(steps, args.method, args.batch),
           "recorded_mb": max(recorded, default=0.0),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss}
    if device.type == "cuda":
        out |= {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20, "base_cuda_mb": base_cuda}
    return out


def interleaved(args) -> dict:
    """Every method's runs alternated with plain LoRA runs in one process, `--rounds` times (ABAB...): a shared
    machine's load moves both sides alike, so the ratio to LoRA is the method's own, not the load's between two
    processes."""
    denoiser, examples, frozen = setup(args)
    methods = list(dict.fromkeys(["lora", *args.methods]))
    steps: dict[str, list] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            steps[m] += run_steps(denoiser, examples, frozen, m, args)
    est = {m: step_estimate(s, m, args.batch) for m, s in steps.items()}
    return {m: {**e, "vs_lora": e["step_s"] / est["lora"]["step_s"]} for m, e in est.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--res", type=int, default=256, help="image resolution in px (latent = res / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--preset", choices=["attn", "attn_ff", "full"], default="attn", help="LoRA target preset")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS),
                    default=["lora", "cat", "cat/k2", "cat/k4", "cat/p0.5", "cat/local"])
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved timing: runs of each method, alternated with LoRA runs")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method processes (peak memory); time only")
    ap.add_argument("--alpha", type=float, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--method", choices=list(METHODS), help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.alpha is not None or args.method is not None:
        print(json.dumps(measure(args)))
        return
    if args.interleaved:
        print(json.dumps(interleaved(args)))
        return
    methods = list(dict.fromkeys(["lora", *args.methods]))
    child = [a for a in sys.argv[1:] if a != "--no-memory"]
    rows = {}
    for m in methods if not args.no_memory else []:  # each in its own process: peak memory is per method
        res = subprocess.run([sys.executable, __file__, *child, "--method", m], capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"{m} failed:\n{res.stderr[-3000:]}")
        rows[m] = json.loads(res.stdout.strip().splitlines()[-1])
    res = subprocess.run([sys.executable, __file__, *child, "--interleaved"], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"the interleaved timing failed:\n{res.stderr[-3000:]}")
    inter = json.loads(res.stdout.strip().splitlines()[-1])
    params = sum(p.numel() for p in UNet(**CONFIGS[args.unet]).parameters()) if args.unet != 'sd15' else 859520964
    print(f"UNet {args.unet} ({params:,} params), {args.res}px, batch {args.batch}, rank {args.rank} ({args.preset}), "
          f"{args.device}, precision {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; interleaved: {args.rounds} runs of each, alternated")
    names = {"lora": "LoRA (alpha 0)", "cat": "CAT (alpha 1)",
             **{m: f"CAT (alpha 1), {option_name(m)}" for m in METHODS if "/" in m}}
    print("| method | step s (interleaved) | step / LoRA step (interleaved) | step / its own plain steps | timed steps "
          "with the term | identity on the world | step s (own process) | peak MB | training MB (peak - model) | "
          "peak / LoRA "
          "| recorded inputs MB (local keep) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    mem = base = None
    if rows:
        lora = rows["lora"]
        mem = "peak_cuda_mb" if "peak_cuda_mb" in lora else "peak_rss_mb"
        base = "base_cuda_mb" if mem == "peak_cuda_mb" else "base_rss_mb"
    for m in methods:
        i, r = inter[m], rows.get(m)
        own = f"{i['in_run']:.2f}" if i.get("in_run") else "-"
        kept = {True: "kept", False: "lost", None: "not measured"}[KEEPS_IDENTITY.get(m)] if m != "lora" else "-"
        alone = (f"{r['step_s']:.3f} | {r[mem]:.0f} | {r[mem] - r[base]:.0f} | {r[mem] / rows['lora'][mem]:.2f} | "
                 + (f"{r['recorded_mb']:.1f}" if r.get("recorded_mb") else "-") if r else "- | - | - | - | -")
        print(f"| {names.get(m, m)} | {i['step_s']:.3f} | {i['vs_lora']:.2f} | {own} | "
              f"{i['steps_with_term']}/{i['steps_timed']} | {kept} | {alone} |")
    if "cat" in inter:
        print(f"CAT / LoRA step time (interleaved): {inter['cat']['vs_lora']:.2f} (FLOP floor 7/3 = 2.33)")
    if "cat" in rows:
        cat, lora = rows["cat"], rows["lora"]
        print(f"CAT / LoRA peak memory: {cat[mem] / lora[mem]:.2f}; training overhead ratio: "
              f"{(cat[mem] - cat[base]) / max(lora[mem] - lora[base], 1e-9):.2f}")
    # Against plain LoRA runs interleaved with the option's own runs in one process, and only the options that kept the
    # identity on the world: an option that loses it is not preservation at a price, it is another method.
    ratios = {m: i["vs_lora"] for m, i in inter.items()
              if m != "lora" and KEEPS_IDENTITY.get(m) and i["vs_lora"] == i["vs_lora"]}
    if ratios:
        best = min(ratios, key=ratios.get)
        print(f"cheapest preservation step / plain step: {ratios[best]:.2f}x ({option_name(best)})")


def option_name(m: str) -> str:
    every, fraction = keep_options(m)
    return ", ".join(["local keep"] * (estimator(m) == "local") + [f"keep_every {every}"] * (every > 1)
                     + [f"keep_fraction {fraction:g}"] * (fraction < 1)) or "exact CAT"


if __name__ == "__main__":
    main()
