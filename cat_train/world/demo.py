"""`python -m cat_train demo --out DIR`: plain LoRA against CAT on the embedded world, no ComfyUI, no download.

The embedded base model is the world model of `cat_train/world` (coloured shapes, 32 px, pretrained
here and committed): NOT Stable Diffusion. Both runs learn the same identity ("a sks circle", 5
images, same seed and steps); the only difference is the CAT factor (0 = plain LoRA). Images are drawn
from the same noise with and without the trigger and for other classes, and scored by the world-CLIP:
the grid shows the leak (tokenless circles turning into the identity) and the table its size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import bench
from ..training.checks import (OneLineParser, non_negative_float, non_negative_int, output_folder, positive_float,
                               positive_int)
from .. import families
from ..adapters.export import next_free_path, save_lora, to_kohya, training_metadata
from ..measure.plot import loss_curve
from ..measure.validation import ValidationLog
from . import generator as wg
from . import model as wm
from .watch import RunWatch

# Best-step drift bound on this world, in the world model's v-prediction units. The base model's own fit error at
# the validation points is 0.41; seed 0, 400 steps: CAT's keep drift peaks at 0.06 (step 50) and settles at
# 0.02-0.03 from step 150 as the CAT term pulls it back; plain LoRA's passes 0.16 by step 50 and stays at
# 0.21-0.34. 0.05 (an eighth of the base's error) separates the two.
MAX_KEEP_DRIFT = 0.05
SCORES = ("PS", "IS", "KPS", "identity", "leak", "drift", "drift_other", "class_acc")


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m cat_train demo", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=output_folder,
                    help="output folder (created; LoRA files already there are never overwritten)")
    ap.add_argument("--steps", type=positive_int, default=bench.BenchConfig.steps)
    ap.add_argument("--cat-factor", "--alpha", dest="alpha", type=non_negative_float, default=1.0,
                    help="CAT factor α of the CAT run (the other run is plain LoRA, CAT factor 0)")
    ap.add_argument("--lr", type=positive_float, default=bench.BenchConfig.lr,
                    help="higher than the paper's 1e-4: a 1.7M-parameter model and few steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=non_negative_int, default=100,
                    help="score both runs every N steps: preview grid, IS/KPS/identity/leak, best step (0 = off)")
    ap.add_argument("--validate-every", type=positive_int, default=25, help=
            "validation row (fit, keep drift) every N steps")
    ap.add_argument("--is-tolerance", type=non_negative_float, default=0.02, help=
            "best step: IS within this of the best")
    ap.add_argument("--max-keep-drift", type=non_negative_float, default=MAX_KEEP_DRIFT,
                    help="best step: keep drift at most this (mean squared v difference on prompts without the "
                         "trigger)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(bench.NOTE)
    cat = f"cat{args.alpha:g}"
    c = bench.BenchConfig(steps=args.steps, lr=args.lr, seeds=(args.seed,), per_prompt=2, sample_steps=15,
                              methods=("lora", cat))
    watches: dict[str, RunWatch] = {}
    vlog = ValidationLog(out / "validation.csv", tensorboard_dir=out / "tensorboard")

    def watch(world, method, seed, examples, noise, base):
        name = "lora" if method == "lora" else "cat"
        watches[name] = RunWatch(world, c, name, examples, noise, base, out, vlog, args.save_every,
                                 args.validate_every, seed)
        return watches[name].start()

    res = bench.run(c, watch=watch if args.save_every else None)
    vlog.close()
    paths = bench.write(res, out)
    net = wm.build()[0]
    names = families.of(net).kohya_names(net)
    report: dict = {"note": bench.NOTE, "trigger": wg.TRIGGER, "class_word": wg.IDENTITY_CLASS,
                    "images": len(wg.identity_scenes()), "steps": args.steps, "runs": {},
                    "grid": str(paths["grid"]), "table": str(paths["table"])}
    for key, name, alpha in (("lora", "lora", 0.0), (cat, "cat", args.alpha)):
        tr = res["trained"][key]
        path = out / f"demo_{name}.safetensors"
        path = next_free_path(out, path.stem) if path.exists() else path
        meta = training_metadata(cat_factor=alpha, triggers=[wg.TRIGGER], preservation="class",
                                 class_word=wg.IDENTITY_CLASS,
                                 steps=args.steps, rank=c.rank, alpha=c.rank, lr=args.lr, seed=args.seed,
                                 num_images=report["images"], resolution=32, target_preset=c.preset,
                                 base_model="cat_train world base (not SD)", output_name=path.stem)
        save_lora(path, to_kohya(tr.weights, names), meta)
        scores = {k: res["methods"][key][k]["mean"] for k in SCORES}
        report["runs"][name] = {"cat_factor": alpha, "final_fit": tr.history[-1]["fit"], "lora": str(path), **scores}
    base = {k: res["methods"]["base"][k]["mean"] for k in SCORES}
    report["base"] = base
    hl, hc = res["trained"]["lora"].history, res["trained"][cat].history
    loss_curve([{"step": a["step"], "fit (lora)": a["fit"], "fit (cat)": b["fit"],
                 "keep (cat)": b["keep"]} for a, b in zip(hl, hc)],
               keys=("fit (lora)", "fit (cat)", "keep (cat)"),
               title="CAT demo: fit and keep terms").save(out / "loss_curve.png")
    if watches:
        report.update(measure(watches, report, args))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lo, ca = report["runs"]["lora"], report["runs"]["cat"]
    print("\n" + bench.table(res))
    print(f"with the trigger ('a {wg.TRIGGER} {wg.IDENTITY_CLASS}'), share drawn as the identity and identity "
          f"similarity IS:\n  plain LoRA (CAT factor 0):  {lo['identity']:.2f}   IS {lo['IS']:.3f}\n"
          f"  CAT (CAT factor {args.alpha:g}):         {ca['identity']:.2f}   IS {ca['IS']:.3f}\n"
          f"without it ('a {wg.IDENTITY_CLASS}'), share of circles that turned into the identity (leak):\n"
          f"  base model:                 {base['leak']:.2f}\n"
          f"  plain LoRA (CAT factor 0):  {lo['leak']:.2f}   KPS {lo['KPS']:.3f}   drift from base {lo['drift']:.3f}\n"
          f"  CAT (CAT factor {args.alpha:g}):         {ca['leak']:.2f}   KPS {ca['KPS']:.3f}   drift from base "
          f"{ca['drift']:.3f}\nwrote {paths['grid']} (rows: methods; columns: with sks, without, other classes), "
          f"{paths['table']},\n      {lo['lora']}, {ca['lora']}, {out / 'loss_curve.png'}, {out / 'report.json'} in "
          f"{res['seconds']:.0f}s")
    if watches:
        print(per_step_text(report))
    return 0


STEP_COLUMNS = ("IS", "KPS", "identity", "leak", "drift", "fit", "keep_drift", "probe_drift")
COMPARED = ("identity", "leak", "IS", "KPS", "drift")


def measure(watches: dict[str, RunWatch], report: dict, args) -> dict:
    """report.json's per-step table, best step per run (docs/measuring.md) and how it compares with the final step."""
    per_step, best = {}, {}
    for name, w in watches.items():
        per_step[name] = w.table()
        if not per_step[name]:  # fewer steps than save_every: validation rows only, nothing to pick from
            continue
        b = w.best(args.is_tolerance, args.max_keep_drift)
        row = next(r for r in per_step[name] if r["step"] == b["step"])
        final = report["runs"][name]
        b["at_best"] = {k: row[k] for k in COMPARED}
        b["final"] = {"step": args.steps, **{k: final[k] for k in COMPARED}}
        b["rule"] = {"is_tolerance": args.is_tolerance, "max_keep_drift": args.max_keep_drift}
        best[name] = b
    return {"validation": str(next(iter(watches.values())).vlog.path), "per_step": per_step, "best_step": best,
            "previews": {n: [str(p) for p in w.previews] for n, w in watches.items()},
            "measure_seconds": {n: {k: round(v, 2) for k, v in w.seconds.items()} for n, w in watches.items()},
            "preview_seconds_per_round": {n: round(sum(w.previewer.seconds) / len(w.previewer.seconds), 3)
                                          for n, w in watches.items()}}


def floor_notes(report: dict) -> list[str]:
    """Why a step reads IS 0.0000 or KPS 1.0000: pairs of images with similarity <= 0 (clamped to the floor), each of
    which pulls the harmonic mean to ~0 (IS = H, KPS = 1 - H)."""
    notes = []
    for name, rows in report["per_step"].items():
        for r in rows:
            parts = []
            k, n = r.get("IS_floor", (0, 0))
            if k:
                parts.append(f"IS {r['IS']:.4f}: {k} of {n} (reference, trigger image) pairs have similarity <= 0, "
                             "and one such pair pulls the harmonic mean to 0 (the adapter draws something unlike "
                             "every reference)")
            k, n = r.get("KPS_floor", (0, 0))
            if k:
                parts.append(f"KPS {r['KPS']:.4f}: {k} of {n} (without, with trigger) pairs have similarity <= 0, "
                             "so the harmonic mean is 0 and KPS reads 1 (the trigger changes the whole image, "
                             "not a sign of no leak)")
            if parts:
                notes.append(f"  {name} step {r['step']}: " + "; ".join(parts))
    return notes


def per_step_text(report: dict) -> str:
    lines = ["\nper saved step (world-CLIP scores of that step's adapter; validation at the same points every time):",
             "  run   step  " + " ".join(f"{k:>11s}" for k in STEP_COLUMNS)]
    for name, rows in report["per_step"].items():
        for r in rows:
            lines.append(f"  {name:5s} {r['step']:5d}  "
                         + " ".join(f"{r.get(k, float('nan')):11.4f}" for k in STEP_COLUMNS))
    lines += floor_notes(report)
    for name, b in report["best_step"].items():
        at, fin = b["at_best"], b["final"]
        lines.append(f"best step {name}: {b['step']} ({b['reason']})\n  at step {b['step']} vs final {fin['step']}: " +
                     ", ".join(f"{k} {at[k]:.3f} vs {fin[k]:.3f}" for k in COMPARED))
    if not report["best_step"]:
        lines.append("no saved step to pick from: --steps is below --save-every")
    lines.append(f"wrote {report['validation']}, previews/ ({sum(len(v) for v in report['previews'].values())} grids); "
                 f"preview round {max(report['preview_seconds_per_round'].values()):.2f}s")
    return "\n".join(lines)
