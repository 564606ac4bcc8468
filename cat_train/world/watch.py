"""The demo watching its own training runs through the trainer's hooks, as a user would watch theirs.

Per run (plain LoRA, CAT): before training, the base row of the preview grid and a validation row at step 0;
every `validate_every` steps (trainer `callback`) a validation row (fit, keep drift, probe drift: no sampling);
at every saved step (trainer `on_save`) a preview round, the grid so far as previews/<run>_stepNNNNNN.png, and
the world's own scores of that step's adapter: IS, KPS, identity, leak and drift, on the same fixed noise and
prompts as the final evaluation (so the last saved step's scores are the final figures). The per-step table
joins both by step, and `best_step` picks from it.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..adapters.lora import adapter_switched
from ..measure.best_step import pick_best_step
from ..measure.observe import observing
from ..measure.preview import Previewer, preview_prompts
from ..data.prompts import preservation_prompt
from ..measure.validation import ValidationLog, Validator, every
from . import bench
from . import generator as wg
from . import model as wm

# Prompts the CAT term never sees, to watch besides the preservation prompts: a neighbour (same class,
# another colour) and another class.
PROBES = ("a purple circle on a white background", "a red square on a grey background")


def _images(z):
    return (wm.decode(z).permute(0, 2, 3, 1) + 1) / 2


class RunWatch:
    def __init__(self, world: bench.World, c: bench.BenchConfig, name: str, examples: list, noise: dict, base: dict,
                 out: Path, vlog: ValidationLog, save_every: int, validate_every: int, seed: int):
        self.world, self.c, self.name, self.noise, self.base = world, c, name, noise, base
        self.out, self.vlog = out, vlog
        self.save_every, self.validate_every = save_every, validate_every
        self.ps = bench.prompts(c.per_prompt)
        probes = {p: {k: v[0] for k, v in world.encode_text([p]).items()} for p in PROBES}
        # 2 points per image, all images in one pass: the demo stays within 1.5x of its time without measuring
        self.validator = Validator(world.den, examples, probes=probes, points=2, seed=seed, batch_size=len(examples))
        first = bench.identity_items()[0][1]
        pres = sorted({preservation_prompt(cap, trig, "class", bench.CLASS) for _, cap, trig in bench.identity_items()},
                      key=lambda p: list(wg.BACKGROUNDS).index(p.split()[-2]))
        self.previewer = Previewer(world.den, world.encode_text, preview_prompts(first, [wg.TRIGGER], pres),
                                   [wg.TRIGGER],
                                   wm.LATENT_SHAPE, _images, seed=seed, steps=c.sample_steps, cfg=c.cfg, clip_x0=1.0,
                                   scale=3)
        self.scores: list[dict] = []
        self.previews: list[Path] = []
        self.validation: list[dict] = []
        self.seconds = {"validation": 0.0, "preview": 0.0, "scores": 0.0}

    def start(self) -> dict:
        """The base row and the step-0 validation; then the trainer hooks."""
        self.previewer.base()
        self._validate(0)
        return {"save_every": self.save_every, "on_save": self.on_save,
                "callback": every(self.validate_every, self._validate, lambda row: None)}

    def _validate(self, step: int) -> dict:
        t0 = time.perf_counter()
        row = self.validator(step)
        self.seconds["validation"] += time.perf_counter() - t0
        self.validation.append(row)
        self.vlog.write({"run": self.name, **row})
        return row

    def on_save(self, step: int, _weights) -> None:
        t0 = time.perf_counter()
        self.previewer(step)
        self.previews.append(self.previewer.save(self.out / "previews" / f"{self.name}_step{step:06d}.png"))
        t1 = time.perf_counter()
        module = self.world.den.module
        with observing(module), adapter_switched(module, True):
            imgs = {k: self.world.generate(self.ps[k], self.noise[k], self.c) for k in ("token", "notoken")}
        self.scores.append({"step": step, **bench.subject_scores(self.world, imgs, self.base, self.c.task)})
        self.seconds["preview"] += t1 - t0
        self.seconds["scores"] += time.perf_counter() - t1

    def table(self) -> list[dict]:
        """Per saved step: IS, KPS, identity, leak, drift (world scores) and fit, keep_drift, probe_drift
        (validation)."""
        val = {r["step"]: r for r in self.validation}
        return [{**s, **{k: v for k, v in val.get(s["step"], {}).items() if k != "step"}} for s in self.scores]

    def best(self, is_tolerance: float, max_keep_drift: float | None) -> dict:
        return pick_best_step(self.table(), is_tolerance, max_keep_drift).to_dict()
