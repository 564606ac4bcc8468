"""Loss curves and score bars as images with PIL alone (no plotting library in ComfyUI's requirements).

Readability rules, each from a complaint about the first version: tick labels never repeat (enough
digits to tell neighbours apart), curves that coincide stay visible (each series has its own colour
and line style, wide ones under narrow ones, and a legend), and text uses Pillow's scalable font (its
old bitmap font drops spaces: "base (noadapter)").
"""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

# colour-blind-safe (Okabe-Ito) and told apart in grey by the line styles as well
PALETTE = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233)]
# (width, dash, gap): the first series widest and solid, later ones thinner and dashed so they show on top
STYLES = [(4, 0, 0), (2, 9, 5), (2, 3, 4), (2, 12, 4), (1, 0, 0), (1, 4, 3)]
GREY, INK, GRID = (110, 110, 110), (30, 30, 30), (232, 232, 232)


def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's embedded scalable font (Pillow >= 10.1); the bitmap default only on older Pillow."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def text(d: ImageDraw.ImageDraw, xy: tuple[float, float], s: str, fnt, fill, anchor: str = "la") -> None:
    """d.text with word gaps of a third of the font size: the embedded font's own space is 2-3 px at
    these sizes, which reads as no space at all ("isthe subject")."""
    words = s.split(" ")
    size = getattr(fnt, "size", 11)
    gap = max(round(size / 3), int(d.textlength(" ", font=fnt)))
    widths = [d.textlength(w, font=fnt) for w in words]
    total = sum(widths) + gap * (len(words) - 1)
    x, y = xy
    x -= {"l": 0, "m": total / 2, "r": total}[anchor[0]]
    for w, wd in zip(words, widths):
        if w:
            d.text((x, y), w, fill=fill, font=fnt, anchor="l" + anchor[1])
        x += wd + gap


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def labels(values: Sequence[float]) -> list[str]:
    """Shortest %g labels (up to 6 digits) that tell every tick apart: never '1.07e+00' and '1.07e+00'.
    Whole numbers (steps) are written out: 100, not 1e+02."""
    if all(math.isfinite(v) and float(v).is_integer() and abs(v) < 1e7 for v in values):
        return [str(int(v)) for v in values]
    for digits in range(1, 7):
        out = [f"{v:.{digits}g}" for v in values]
        exact = all(abs(float(t) - v) <= 1e-9 * max(abs(v), 1e-300) for t, v in zip(out, values))
        if len(set(out)) == len(out) and (exact or digits >= 3):  # round ticks exactly; others from 3 digits
            return out
    return [f"{v:.6g}" for v in values]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2, 5 x 10^k steps) covering [lo, hi] with about n of them."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis from 10^lo to 10^hi: decades, then 2 and 5 between them, else linear ticks."""
    decades = [10.0 ** k for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    if len(decades) >= 3:
        step = math.ceil(len(decades) / 6)  # at most ~6 labels over many decades
        return decades[::-1][::step][::-1]
    fine = sorted(m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)
                  if lo - 1e-9 <= math.log10(m * 10.0 ** k) <= hi + 1e-9)
    if len(fine) >= 3:
        return fine
    return [v for v in nice_ticks(10 ** lo, 10 ** hi, 4) if v > 0]


def _polyline(d: ImageDraw.ImageDraw, pts: Sequence[tuple[float, float]], fill, width: int, dash: int = 0,
              gap: int = 0):
    if len(pts) < 2:
        return
    if not dash:
        d.line(list(pts), fill=fill, width=width, joint="curve")
        return
    on, left = True, float(dash)  # walk the path, switching pen on/off every dash/gap pixels
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while seg - pos > 1e-9:
            run = min(left, seg - pos)
            if on:
                a, b = pos / seg, (pos + run) / seg
                d.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                       fill=fill, width=width)
            pos += run
            left -= run
            if left <= 1e-9:
                on = not on
                left = float(dash if on else gap)


def _faint(c, amount: float = 0.3):
    return tuple(int(255 - (255 - ch) * amount) for ch in c)


def loss_curve(history: Sequence[dict], keys: Sequence[str] = ("fit", "keep"), size=(640, 360), log_y=True,
               title: str = "", smooth: bool = True) -> Image.Image:
    """history rows {'step', 'fit', 'keep', ...}: faint raw lines, EMA-smoothed lines on top, log-y by default.
    smooth=False: the values themselves, each a dot (a few measured points, e.g. per saved step, where an EMA drew a
    line through no measured value and its legend named a value nothing had).

    On a log axis values <= 0 (CAT's keep term is exactly 0 at the first step) sit on the bottom edge, and
    the axis spans at most 5 decades below the highest value so one tiny value cannot flatten the rest.
    """
    w, h = size
    f, fs = font(13), font(11)
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    series = {k: [float(r[k]) for r in history] for k in keys if history and k in history[0]}
    steps = [float(r.get("step", i + 1)) for i, r in enumerate(history)]
    tf = (lambda v: math.log10(v) if v > 0 else -math.inf) if log_y else (lambda v: v)
    vals = [tf(v) for s in series.values() for v in s if math.isfinite(v) and (v > 0 or not log_y)]
    left, right, top, bottom = 64, 26, 30 + 18 * math.ceil(len(series) / 3), 40
    if title:
        text(d, (left, 6), title, f, INK)
    if not vals:
        d.rectangle([left, top, w - right, h - bottom], outline=GREY)
        text(d, (left + 10, top + 10), "no finite values yet", f, INK)
        return img
    lo, hi = min(vals), max(vals)
    if log_y:
        lo = max(lo, hi - 5)
    if hi - lo < 1e-12:  # a flat curve: give it some room
        lo, hi = (lo - 0.5, hi + 0.5) if log_y else (lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1)
    pad = (hi - lo) * 0.04
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
    pw, ph = w - left - right, h - top - bottom

    def X(step: float) -> float:
        return left + pw * (step - x_lo) / (x_hi - x_lo)

    def Y(u: float) -> float:  # u in axis units (log10 on a log axis)
        return top + ph * (1 - (min(max(u, lo), hi) - lo) / (hi - lo))

    yt = log_ticks(lo, hi) if log_y else nice_ticks(lo, hi)
    for v, lab in zip(yt, labels(yt)):
        y = Y(math.log10(v) if log_y else v)
        d.line([(left, y), (w - right, y)], fill=GRID)
        d.line([(left - 4, y), (left, y)], fill=GREY)
        text(d, (left - 7, y), lab, fs, GREY, "rm")
    xt = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi]
    for v, lab in zip(xt, labels(xt)):
        d.line([(X(v), h - bottom), (X(v), h - bottom + 4)], fill=GREY)
        text(d, (X(v), h - bottom + 6), lab, fs, GREY, "mt")
    text(d, (left + pw / 2, h - 4), "step", fs, GREY, "md")
    text(d, (4, top - 16), "log scale" if log_y else "", fs, GREY)
    d.rectangle([left, top, w - right, h - bottom], outline=GREY)

    def points(line: Sequence[float]):
        return [(X(s), Y(tf(v))) for s, v in zip(steps, line) if math.isfinite(v) or v == -math.inf]

    order = list(series)
    for k in order:  # every raw line first, so no raw line covers a smoothed one
        c = PALETTE[order.index(k) % len(PALETTE)]
        _polyline(d, points(series[k]), _faint(c), 1)
    shown = {k: ema(series[k]) if smooth else series[k] for k in order}
    for j, k in enumerate(order):  # widest first: narrower dashed lines stay visible where curves coincide
        width, dash, gap = STYLES[j % len(STYLES)]
        _polyline(d, points(shown[k]), PALETTE[j % len(PALETTE)], width, dash, gap)
        if not smooth:
            for px, py in points(shown[k]):
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=PALETTE[j % len(PALETTE)])
    lx, ly = left, top - 18 * math.ceil(len(order) / 3) - 4
    legend: dict[str, float] = {}
    for j, k in enumerate(order):  # legend: line sample in the series' colour and style, then its name
        x = lx + (j % 3) * (pw // 3)
        y = ly + 18 * (j // 3) + 8
        width, dash, gap = STYLES[j % len(STYLES)]
        _polyline(d, [(x, y), (x + 28, y)], PALETTE[j % len(PALETTE)], width, dash, gap)
        last = next((v for v in reversed(shown[k]) if math.isfinite(v)), float("nan"))
        legend[k] = last
        text(d, (x + 34, y), f"{k}  {last:.3g}" if math.isfinite(last) else f"{k}  n/a", fs, INK, "lm")
    img.info["legend"] = legend  # for tests: the value each legend entry shows
    return img


def bar_chart(values: dict[str, float], size=(480, 260), title: str = "", hints: dict[str, str] | None = None,
              digits: int = 4) -> Image.Image:
    """Scores in [0, 1] as labelled bars: the value (`digits` decimals) above each bar, name and hint below."""
    w, h = size
    f, fs = font(13), font(11)
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 44, 14, 34 if title else 14, 44
    if title:
        text(d, (left, 8), title, f, INK)
    pw, ph = w - left - right, h - top - bottom

    def Y(v: float) -> float:
        return top + ph * (1 - min(max(v, 0.0), 1.0))

    ticks = [0, 0.25, 0.5, 0.75, 1.0]
    for v, lab in zip(ticks, labels(ticks)):
        d.line([(left, Y(v)), (w - right, Y(v))], fill=GRID)
        text(d, (left - 6, Y(v)), lab, fs, GREY, "rm")
    n = max(1, len(values))
    bw = pw / n
    for i, (k, v) in enumerate(values.items()):
        x0, x1 = left + i * bw + bw * 0.2, left + (i + 1) * bw - bw * 0.2
        c = PALETTE[i % len(PALETTE)]
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        if ok:
            d.rectangle([x0, Y(v), x1, Y(0)], fill=c)
        text(d, ((x0 + x1) / 2, (Y(v) if ok else Y(0)) - 4), f"{v:.{digits}f}" if ok else "n/a", f, INK, "md")
        text(d, ((x0 + x1) / 2, h - bottom + 6), k, f, INK, "mt")
        if hints and k in hints:
            text(d, ((x0 + x1) / 2, h - bottom + 24), hints[k], fs, GREY, "mt")
    d.line([(left, Y(0)), (w - right, Y(0))], fill=GREY)
    return img
