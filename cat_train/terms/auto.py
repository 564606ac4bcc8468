"""Auto preservation: the leak scan inside the training run.

CAT keeps what its preservation prompts say, and only that: a neighbouring class the prompts do not name can
drift as far as under plain LoRA (docs/world-bench.md). The leak-scan loop finds such neighbours after a run
and retrains with them added; this plug-in does the same during the run. Every `every` steps it measures each
probe's keep drift,

    drift(p) = mean over fixed (noise, t) points of ||pred(x_t, t, y_p) - pred'(x_t, t, y_p)||²

(`validation.Validator`: frozen vs adapted prediction, a few no-grad forwards, no sampling), and adds the
worst probes above `threshold` to the preservation prompts, `top_k` at most over the whole run. From then on
each drawn sample's y is, in turn, its own preservation prompt or one of the added probes' prompts for that
image (`BatchTerm.preservation`), so every kept prompt gets an equal share of the CAT term, as when the prompts
are given by hand. Until the first probe is added the run is the plain CAT run, bit for bit: the measurement
draws from its own generator and the turn-taking draws nothing.

The settings, probes and their per-image prompts: cat_train/terms/auto_config.py, which builds this term. The added set
(probe, step, drift) is the
checkpointed state, so a resumed run keeps preserving exactly what the interrupted one had added.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from ..measure.validation import Validator
from ..step.plugs import BatchTerm, RunHook
from .auto_checks import due, scores


class AutoPreservation(BatchTerm, RunHook):
    """cfg: its AutoPreservationConfig."""

    name = "auto"
    history_keys = ("auto_added", "auto_nearest")

    def __init__(self, denoiser, cfg):
        self.denoiser, self.cfg = denoiser, cfg
        self.added: list[tuple[str, int, float]] = []  # (probe, step added, its drift then), in the order added
        self.drift: dict[str, float] = {}  # the last measurement: each probe's score (auto_checks.scores)
        self.kept: float | None = None  # and the kept prompts' drift at the same points (rule `relative`)
        self.nearest: list[dict] = []  # source `nearest`: each class word's chosen probes and their similarity
        self.measured = 0  # its step
        self.turn = 0  # whose turn it is among a sample's kept prompts
        self.examples: Sequence[Any] = ()
        self.order: list[str] = []  # probes in list order: ties go to the earlier one
        self.validator: Validator | None = None
        self.seconds = 0.0  # wall time of the measurements in this process: what the option costs

    def start(self, examples: Sequence[Any]) -> None:
        if any(getattr(ex, "prompts", None) is not None for ex in examples):
            raise ValueError("auto preservation swaps cached preservation conditionings, but this adapter encodes its "
                             "prompts every step (CatVersion); use it with LoRA, or set auto preservation `every` to "
                             "0.")
        self.examples = examples
        self.order = list(dict.fromkeys(p for ex in examples for p in (getattr(ex, "probes", None) or {})))
        if not self.order:
            raise ValueError("auto preservation is on but no training example has probe prompts: build the examples "
                             "with train.build_examples and this loss config (its `auto` settings), or set `every` to "
                             "0.")
        ranked = {id(n): n for ex in examples for n in (getattr(ex, "rankings", None) or ())}
        self.nearest = [n.report() for n in ranked.values()]
        kinds = ("keep", "probe") if self.cfg.rule == "relative" else ("probe",)
        self.validator = Validator(self.denoiser, examples, points=self.cfg.points, seed=self.cfg.seed,
                                   image_probes=True, kinds=kinds, max_images=self.cfg.images)

    def preservation(self, idx, conds, gen):
        if not self.added:
            return conds
        out = []
        for i, own in zip(idx, conds):
            probes = self.examples[i].probes
            kept = [own] + [probes[p] for p, _, _ in self.added if p in probes]
            out.append(kept[self.turn % len(kept)])
            self.turn += 1
        return out

    def end_of_step(self, step: int) -> None:
        if not due(step, self.cfg.every, self.cfg.first) or len(self.added) >= min(self.cfg.top_k, len(self.order)):
            return  # a spent budget, or every probe added, has nothing left to decide: no more measuring
        t0 = time.perf_counter()
        drift, self.kept = self.validator.probe_and_keep_drifts()
        self.drift, self.measured = scores(drift, self.kept, self.cfg.rule), step
        self.seconds += time.perf_counter() - t0
        self.added += [(p, step, self.drift[p]) for p in self.worst()]

    def worst(self) -> list[str]:
        """The probes to add now: not yet added, drift above the threshold, worst first, within what the budget
        leaves."""
        have = {p for p, _, _ in self.added}
        over = [p for p in self.order if p not in have and self.drift.get(p, 0.0) > self.cfg.threshold]
        over.sort(key=lambda p: (-self.drift[p], self.order.index(p)))
        return over[:max(0, self.cfg.top_k - len(self.added))]

    def report(self) -> dict:
        """For the live view and the history: the probes added (probe, step, drift), the last measurement and its
        step."""
        return {"auto_added": [list(a) for a in self.added], "drift": dict(self.drift), "measured": self.measured,
                "threshold": self.cfg.threshold, "top_k": self.cfg.top_k, "seconds": self.seconds,
                "rule": self.cfg.rule, "kept": self.kept, "auto_nearest": self.nearest}

    def state_dict(self) -> dict:
        return {"added": [list(a) for a in self.added], "drift": dict(self.drift), "measured": self.measured,
                "turn": self.turn, "kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        unknown = [p for p, _, _ in state["added"] if p not in self.order]
        if unknown:
            raise ValueError(f"the checkpoint's auto preservation added {unknown}, which are not probes of this run; "
                             "resume with the same probes (source and list) and dataset.")
        self.added = [(str(p), int(s), float(d)) for p, s, d in state["added"]]
        self.drift, self.measured, self.turn = dict(state["drift"]), int(state["measured"]), int(state["turn"])
        self.kept = state.get("kept")


def added_probes(history: Sequence[dict]) -> list[str]:
    """The probes a run added, from its history rows (empty for a run without auto preservation)."""
    return [p for p, _, _ in (history[-1].get("auto_added", []) if history else [])]

