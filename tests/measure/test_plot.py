"""The loss-curve and score images read correctly: distinct, exact tick labels; no curve hidden under
another; word gaps that show; bars to scale."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cat_train.measure.plot import PALETTE, bar_chart, font, labels, log_ticks, loss_curve, nice_ticks, text


@pytest.mark.parametrize("lo, hi",
                         [(1.07e-2, 1.07), (1e-6, 0.3), (0.1, 0.11), (0.5, 0.52), (2e-4, 3e-4), (3.0, 9000.0)])
def test_log_ticks_are_distinct_exact_and_inside(lo, hi):
    ticks = log_ticks(math.log10(lo), math.log10(hi))
    text_ = labels(ticks)
    assert len(ticks) >= 2, ticks
    assert len(set(text_)) == len(text_), text_  # the old axis read 1.07e+00 / 1.07e-02 style duplicates
    assert all(lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9) for t in ticks), (ticks, lo, hi)
    # a label is its tick, not a rounding
    assert all(abs(float(s) - t) <= 1e-9 * t for s, t in zip(text_, ticks)), text_


def test_labels_write_steps_and_quarters_plainly():
    assert labels([0, 0.25, 0.5, 0.75, 1.0]) == ["0", "0.25", "0.5", "0.75", "1"]  # not 0.2 / 0.8
    assert labels(nice_ticks(1, 300, 6)) == ["100", "200", "300"]  # not 1e+02
    assert labels([1e-5, 1e-4]) == ["1e-05", "0.0001"]


def _share(img: Image.Image, color, box) -> int:
    a = np.asarray(img.crop(box)).astype(int)
    return int((np.abs(a - np.array(color)).sum(-1) < 40).sum())


def test_coinciding_curves_both_show():
    """The trainer plots loss, fit and keep; loss = fit + alpha*keep lies on fit when keep is small."""
    hist = [{"step": s, "loss": 0.1 + 1e-3 / s, "fit": 0.1 + 1e-3 / s, "keep": 1e-4} for s in range(1, 201)]
    img = loss_curve(hist, keys=("loss", "fit", "keep"))
    w, h = img.size
    plot = (70, 50, w - 30, h - 45)  # inside the axes, below the legend
    px = {k: _share(img, PALETTE[i], plot) for i, k in enumerate(("loss", "fit", "keep"))}
    assert all(n > 200 for n in px.values()), px  # each curve has its own visible pixels
    legend = (0, 24, w, 46)
    assert all(_share(img, PALETTE[i], legend) > 20 for i in range(3))  # and a legend entry


def test_word_gaps_show():
    img = Image.new("L", (300, 40), 255)
    d = ImageDraw.Draw(img)
    f = font(11)
    text(d, (5, 5), "is the", f, 0)
    text(d, (5, 22), "isthe", f, 0)
    a = np.asarray(img) < 128
    width = [np.nonzero(a[r0:r1].any(0))[0] for r0, r1 in ((0, 20), (20, 40))]
    spaced, tight = width[0].max() - width[0].min(), width[1].max() - width[1].min()
    assert spaced - tight >= 3, (spaced, tight)  # Pillow's bitmap font drew "base (noadapter)": a 1-2 px gap


def test_bars_are_to_scale():
    img = bar_chart({"PS": 0.25, "IS": 0.5, "KPS": 1.0}, size=(480, 260))
    a = np.asarray(img).astype(int)
    heights = []
    for i in range(3):
        col = a[:, 44 + int((480 - 58) * (i + 0.5) / 3)]
        heights.append(int((np.abs(col - np.array(PALETTE[i])).sum(-1) < 10).sum()))
    assert heights[1] == pytest.approx(2 * heights[0], abs=2), heights
    assert heights[2] == pytest.approx(4 * heights[0], abs=3), heights


def test_a_chart_of_a_few_measured_points_shows_the_values_not_a_smoothed_line():
    """Issue 32: steps.png (IS, KPS per saved step) drew an EMA through 3-6 points: its line and its legend's value
    matched no measured value. smooth=False draws the values and names the last one."""
    from cat_train.measure.plot import ema, loss_curve

    rows = [{"step": 100, "IS": 0.2, "KPS": 0.9}, {"step": 200, "IS": 0.6, "KPS": 0.7},
            {"step": 300, "IS": 0.8, "KPS": 0.5}]
    raw = loss_curve(rows, keys=("IS", "KPS"), smooth=False)
    assert raw.info["legend"] == {"IS": 0.8, "KPS": 0.5}
    smoothed = loss_curve(rows, keys=("IS", "KPS"))  # a loss curve of many steps keeps its EMA
    assert smoothed.info["legend"]["IS"] == ema([0.2, 0.6, 0.8])[-1] != 0.8
