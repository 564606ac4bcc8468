"""Issue 32: the demo printed "IS 0.0000 KPS 1.0000" for a step without a word on why (pairs of images with
similarity <= 0, clamped to the floor, pull the harmonic mean to 0)."""
from __future__ import annotations

from cat_train.world.demo import per_step_text


def report(rows):
    return {"per_step": {"lora": rows}, "best_step": {}, "validation": "v.csv", "previews": {"lora": []},
            "preview_seconds_per_round": {"lora": 0.1}}


def test_a_step_at_the_floor_is_explained():
    rows = [{"step": 50, "IS": 3.9e-6, "KPS": 0.9999961, "IS_floor": [3, 8], "KPS_floor": [1, 4]},
            {"step": 100, "IS": 0.71, "KPS": 0.31, "IS_floor": [0, 8], "KPS_floor": [0, 4]}]
    text = per_step_text(report(rows))
    assert "lora step 50: IS 0.0000: 3 of 8 (reference, trigger image) pairs have similarity <= 0" in text, text
    assert "KPS 1.0000: 1 of 4 (without, with trigger) pairs have similarity <= 0" in text, text
    assert "lora step 100" not in text  # nothing at the floor: nothing to explain
