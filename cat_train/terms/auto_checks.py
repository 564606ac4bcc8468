"""When auto preservation measures, and what counts as drifting (terms/auto.py asks these two questions here).

When: at `first`, then at each doubling of it below `every` (first 5, every 50: steps 5, 10, 20, 40), then at every
multiple of `every`. A neighbour the run lets collapse moves most in the first tens of steps at a high learning rate
(docs/auto-preservation.md: on seed 1 of the world a check at step 50 came too late to win it back), and a doubling
schedule looks early for a handful of extra measurements instead of `every` / `first` of them.

What: with `rule = relative`, a probe's score is its keep drift divided by the keep drift of the image's own
preservation prompt (the class prompt CAT keeps) at the same points. Both are squared prediction differences in the
model's units, so the ratio has none: scaling the model's outputs by 10 multiplies both by 100 and leaves every score
as it was, and the ratio does not shrink with the learning rate or the step the way the drift itself does. A
neighbour with score > 1 moves more than the prompt CAT protects: it is what CAT alone lets go. With
`rule = absolute` the score is the drift itself, in the model's units (the behaviour before the rule existed).
"""
from __future__ import annotations

from typing import Literal, Mapping

Rule = Literal["absolute", "relative"]
RULES = ("absolute", "relative")


def due(step: int, every: int, first: int = 0) -> bool:
    """Whether the measurement runs after optimizer step `step` (see the module docstring)."""
    if every <= 0 or step <= 0:
        return False
    if step % every == 0:
        return True
    if first <= 0 or step >= every or step < first:
        return False
    q, r = divmod(step, first)
    return r == 0 and q & (q - 1) == 0  # first, 2·first, 4·first, ...


def scores(drift: Mapping[str, float], kept: float | None, rule: Rule) -> dict[str, float]:
    """What the threshold is compared with, per probe: the drift itself (absolute) or its ratio to the kept prompt's."""
    if rule == "absolute":
        return dict(drift)
    if not kept or kept <= 0:  # nothing moved yet (LoRA B still 0): no probe moved more than the kept prompt
        return {p: 0.0 for p in drift}
    return {p: d / kept for p, d in drift.items()}
