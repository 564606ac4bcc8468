"""Each probe's keep drift over the kept class prompt's, per timestep, during a `cat1` run on the world (seed given).

The numbers that chose auto preservation's `relative` threshold and `first` (docs/auto-preservation.md): CAT with the
class prompt alone (no probe is ever added: `every` is past the run), and at the listed steps every probe's drift
divided by the class prompt's, at 2 noises x 10 fixed timesteps (50, 150, ..., 950) of every training image.

    OMP_NUM_THREADS=1 python benchmarks/auto_drift_ratio.py --seed 1    # ~25 min on 2 shared cores

Prints, per step, the class prompt's drift per timestep and each probe's ratio per timestep and over all of them
(sum of its drifts over sum of the class prompt's); --out writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cat_train.adapters.lora import LoraSpec  # noqa: E402
from cat_train.measure.validation import Validator  # noqa: E402
from cat_train.terms.auto_config import AutoPreservationConfig  # noqa: E402
from cat_train.training import CatLossConfig, TrainConfig, build_examples, train  # noqa: E402
from cat_train.world import bench as B  # noqa: E402

TIMESTEPS = [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
# the 8 nearest before the vocabulary kept only things an image shows (less blue, plus red)
PROBES = ("square", "triangle", "star", "cross", "background", "white", "red", "green")
STEPS = (1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 100, 200, 400)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="steps measured after")
    ap.add_argument("--train-steps", type=int, default=B.BenchConfig().steps)
    a = ap.parse_args(argv)
    world, c = B.World(), B.BenchConfig()
    lc = CatLossConfig(alpha=1.0, preservation="class", class_word=B.CLASS,
                       # probes encoded, never added
                       auto=AutoPreservationConfig(every=10**6, source="list", probes=PROBES))
    ex = build_examples(B.identity_items(), world.encode_text, lc, token_positions=B.trigger_positions)
    val = Validator(world.den, ex, points=2 * len(TIMESTEPS), seed=0, image_probes=True, kinds=("keep", "probe"))
    for img in val.images:  # fixed timesteps instead of drawn ones: the ratio per timestep
        img.t = torch.tensor(TIMESTEPS * 2)
    rows = []

    def callback(info):
        if info.step not in a.steps:
            return
        by: dict[str, list] = {}
        for kind, name, d in val._drifts():
            by.setdefault(name or "class", []).append(d.view(2, len(TIMESTEPS)).mean(0))
        r = {k: torch.stack(v).mean(0) for k, v in by.items()}
        rows.append({"step": info.step, **{k: v.tolist() for k, v in r.items()}})
        print(info.step, "class", " ".join(f"{x:.1e}" for x in r["class"].tolist()))
        for p in PROBES:
            print(f"    {p:10s}", " ".join(f"{x:5.2f}" for x in (r[p] / r["class"]).tolist()),
                  f"mean-ratio {float(r[p].sum() / r['class'].sum()):.2f}", flush=True)
    train(world.den, ex, lc, LoraSpec(rank=c.rank, alpha=c.rank, preset=c.preset),
          TrainConfig(steps=a.train_steps, lr=c.lr, seed=a.seed), callback=callback)
    if a.out:
        a.out.write_text(json.dumps({"timesteps": TIMESTEPS, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
