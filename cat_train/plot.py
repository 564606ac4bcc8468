"""Loss curves as images with PIL alone (no plotting library): raw and EMA-smoothed series."""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw

PALETTE = [(60, 110, 220), (40, 160, 90), (220, 60, 60), (150, 80, 200), (230, 140, 20)]


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def loss_curve(history: Sequence[dict], keys: Sequence[str] = ("fit", "keep"), size=(640, 360), log_y=True,
               title: str = "") -> Image.Image:
    """history rows {'step', 'fit', 'keep', ...}; faint raw lines, bold smoothed lines, log-y by default."""
    w, h = size
    left, right, top, bottom = 60, 12, 28, 30
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline=(160, 160, 160))
    if title:
        d.text((left, 8), title, fill=(0, 0, 0))
    series = {k: [float(r[k]) for r in history] for k in keys if history and k in history[0]}
    tf = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    vals = [tf(v) for s in series.values() for v in s if math.isfinite(v) and (v > 0 or not log_y)]
    if not vals:
        d.text((left + 10, top + 10), "no finite values yet", fill=(0, 0, 0))
        return img
    lo, hi = min(vals), max(vals)
    if log_y:  # a term that starts at ~0 (CAT's, at init) would flatten everything else
        lo = max(lo, hi - 4)
    hi = hi if hi > lo else lo + 1
    n = max(len(s) for s in series.values())

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, n - 1))
        return x, top + (h - top - bottom) * (1 - (max(tf(v), lo) - lo) / (hi - lo))

    for k, s in series.items():
        c = PALETTE[list(series).index(k) % len(PALETTE)]
        faint = tuple(int(255 - (255 - ch) * 0.35) for ch in c)
        for line, color, width in ((s, faint, 1), (ema(s), c, 2)):
            pts = [xy(i, v) for i, v in enumerate(line) if math.isfinite(v) and (v > 0 or not log_y)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=width)
    for frac in (0, 0.5, 1):
        v = lo + (hi - lo) * (1 - frac)
        label = f"{10 ** v:.2e}" if log_y else f"{v:.3g}"
        d.text((4, top + (h - top - bottom) * frac - 5), label, fill=(80, 80, 80))
    d.text((left, h - bottom + 8), "step 1", fill=(80, 80, 80))
    d.text((w - right - 70, h - bottom + 8), f"step {n}", fill=(80, 80, 80))
    x = w - right
    for j, k in reversed(list(enumerate(series))):
        x -= 7 * len(k) + 14
        d.text((x, 8), k, fill=PALETTE[j % len(PALETTE)])
    return img
