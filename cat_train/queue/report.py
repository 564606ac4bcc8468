"""The gathered sweep: one row per run with its IS/KPS and leak scores (runs.md, runs.csv), the IS-vs-KPS chart
(runs.png), and the rule that picks the best-balanced run."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def best_balanced(points: dict[int, tuple[float, float]]) -> int | None:
    """The run whose weaker score is strongest: each of IS and KPS is scaled to its range over the runs (worst
    0, best 1; a score equal on every run counts 1), and the run with the largest smaller scaled score wins.
    Ties: the larger sum, then the earlier run. Runs without both scores are left out. A run that another
    beats on both scores can never win, and neither can a run that is best on one score and worst on the other."""
    pts = {i: p for i, p in points.items() if _finite(p[0]) and _finite(p[1])}
    if not pts:
        return None

    def scale(v, lo, hi):
        return 1.0 if hi - lo < 1e-12 else (v - lo) / (hi - lo)

    lo = [min(p[k] for p in pts.values()) for k in (0, 1)]
    hi = [max(p[k] for p in pts.values()) for k in (0, 1)]
    scaled = {i: (scale(p[0], lo[0], hi[0]), scale(p[1], lo[1], hi[1])) for i, p in pts.items()}
    return min(scaled, key=lambda i: (-min(scaled[i]), -sum(scaled[i]), i))


def short_label(label: dict) -> str:
    """'cat_factor=0.5 rank=8': the input names alone where they tell the sweeps apart."""
    names = [k.rsplit(".", 1)[1] for k in label]
    return " ".join(f"{k.rsplit('.', 1)[1] if names.count(k.rsplit('.', 1)[1]) == 1 else k}={_value_text(v)}"
                    for k, v in label.items())


def sweep_table(records: list[dict], score_node: str | None = None):
    """(columns, rows, points, best run number, the KPS node that scores them). Rows are dicts keyed by column;
    points maps each finished run to its (IS, KPS) from that node."""
    sweep_keys = list(dict.fromkeys(k for r in records for k in r.get("overrides", {})))
    kps_nodes = sorted({n for r in records for n, s in (r.get("scores") or {}).items() if "KPS" in s}, key=_node_order)
    leak_nodes = sorted({n for r in records for n, s in (r.get("scores") or {}).items() if "max_drift" in s},
                        key=_node_order)
    primary = score_node if score_node else (kps_nodes[0] if kps_nodes else None)

    def col(name, nid, many):
        return f"{name}@{nid}" if many else name

    columns = ["run", *sweep_keys, "status", "server", "seconds"]
    columns += [col(m, n, len(kps_nodes) > 1) for n in kps_nodes for m in ("PS", "IS", "KPS")]
    columns += [col(m, n, len(leak_nodes) > 1) for n in leak_nodes for m in ("max drift", "worst probe")]
    columns += ["best"]
    rows, points = [], {}
    for r in sorted(records, key=lambda r: r.get("run", 0)):
        failed = f"{'unknown' if r.get('unknown') else 'failed'}: {r.get('error', '')}".strip()
        row = {"run": r.get("run"), **{k: _value_text(r.get("overrides", {}).get(k, "")) for k in sweep_keys},
               "status": "ok" if r.get("ok") else failed,
               "server": r.get("server", ""), "seconds": f"{r.get('seconds', 0):.1f}"}
        sc = r.get("scores") or {}
        for n in kps_nodes:
            for m in ("PS", "IS", "KPS"):
                row[col(m, n, len(kps_nodes) > 1)] = sc.get(n, {}).get(m, "")
        for n in leak_nodes:
            row[col("max drift", n, len(leak_nodes) > 1)] = sc.get(n, {}).get("max_drift", "")
            row[col("worst probe", n, len(leak_nodes) > 1)] = sc.get(n, {}).get("worst_probe", "")
        if r.get("ok") and primary in sc:
            points[r.get("run")] = (sc[primary].get("IS", math.nan), sc[primary].get("KPS", math.nan))
        rows.append(row)
    best = best_balanced(points)
    for row in rows:
        row["best"] = "best" if best is not None and row["run"] == best else ""
    return columns, rows, points, best, primary


def _value_text(v) -> str:
    """A swept value as the user typed it: 0.5, 1 (not 1.0000), true, text."""
    if isinstance(v, float):
        return f"{v:g}" if v == v and float(f"{v:g}") == v else repr(v)
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _node_order(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else "nan"
    return str(v)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(_cell(row.get(c, ""))) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(columns: list[str], rows: list[dict]) -> str:
    """Numbers in full (the markdown rounds them to 4 decimals)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([row.get(c, "") for c in columns])
    return buf.getvalue()


def chart(points: list[tuple[str, float, float]], best: str | None, size=(720, 460)):
    """IS (x) against KPS (y), one dot per run labelled with its swept values; the best-balanced run ringed.
    A PIL image; cat_train.measure.plot supplies fonts, ticks and colours (Pillow is needed here only)."""
    from PIL import Image, ImageDraw

    from ..measure import plot

    w, h = size
    f, fs = plot.font(13), plot.font(11)
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 24, 40, 48
    plot.text(d, (left, 10), "IS vs KPS, one dot per run; ringed: the best-balanced run", f, plot.INK)

    def span(vs):
        lo, hi = min(vs), max(vs)
        pad = (hi - lo) * 0.12 or max(abs(hi) * 0.1, 0.01)
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span([p[1] for p in points]), span([p[2] for p in points])
    pw, ph = w - left - right, h - top - bottom

    def X(v):
        return left + pw * (v - x0) / (x1 - x0)

    def Y(v):
        return top + ph * (1 - (v - y0) / (y1 - y0))

    yt = [t for t in plot.nice_ticks(y0, y1) if y0 <= t <= y1]
    for v, lab in zip(yt, plot.labels(yt)):
        d.line([(left, Y(v)), (w - right, Y(v))], fill=plot.GRID)
        plot.text(d, (left - 6, Y(v)), lab, fs, plot.GREY, "rm")
    xt = [t for t in plot.nice_ticks(x0, x1, 6) if x0 <= t <= x1]
    for v, lab in zip(xt, plot.labels(xt)):
        d.line([(X(v), top), (X(v), h - bottom)], fill=plot.GRID)
        plot.text(d, (X(v), h - bottom + 6), lab, fs, plot.GREY, "mt")
    d.rectangle([left, top, w - right, h - bottom], outline=plot.GREY)
    plot.text(d, (left + pw / 2, h - 6), "IS (identity: higher = more like the references)", fs, plot.GREY, "md")
    plot.text(d, (6, top - 14), "KPS (higher = less leakage)", fs, plot.GREY)
    boxes: list[tuple[float, float, float, float]] = []
    for i, (name, x, y) in enumerate(points):
        px, py = X(x), Y(y)
        if name == best:
            d.ellipse([px - 11, py - 11, px + 11, py + 11], outline=plot.INK, width=2)
        d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=plot.PALETTE[i % len(plot.PALETTE)])
        anchor = "rm" if px > left + pw * 0.6 else "lm"
        label = name + ("  (best)" if name == best else "")
        lx = px + (-14 if anchor == "rm" else 14)
        tw = d.textlength(label, font=fs)
        x_lo, x_hi = (lx - tw, lx) if anchor == "rm" else (lx, lx + tw)
        ly = _free_row(boxes, x_lo, x_hi, py, LABEL_H)
        if ly != py:  # runs with equal scores share a dot's place: their labels stack, each tied to its dot
            d.line([(px, py), (lx, ly)], fill=plot.GREY)
        boxes.append((x_lo, ly - LABEL_H / 2, x_hi, ly + LABEL_H / 2))
        plot.text(d, (lx, ly), label, fs, plot.INK, anchor)
    img.info["label_boxes"] = boxes  # for tests: where each label went
    return img


LABEL_H = 14  # px a label row takes


def _free_row(boxes, x_lo: float, x_hi: float, y: float, h: float) -> float:
    """The first row at or below y (in run order, then above) that overlaps no label already placed: runs with tied
    scores wrote their labels over each other."""
    for cand in [y + k * h for k in range(len(boxes) + 1)] + [y - k * h for k in range(1, len(boxes) + 1)]:
        if not any(x_lo < b[2] and b[0] < x_hi and cand - h / 2 < b[3] and b[1] < cand + h / 2 for b in boxes):
            return cand
    return y


BEST_RULE = ("best = the run whose weaker score is strongest, IS and KPS each scaled to its range over the finished "
             "runs (docs/batch.md)")


def write_report(out: Path, records: list[dict], score_node: str | None, log=print) -> str:
    """runs.md, runs.csv and runs.png beside --out (runs.json); returns the markdown table."""
    columns, rows, points, best, primary = sweep_table(records, score_node)
    md = markdown_table(columns, rows)
    where = f"KPS Evaluator node {primary}" if primary else "no KPS Evaluator output in these runs"
    out.with_suffix(".md").write_text(f"# Sweep: {len(rows)} run(s)\n\nScores from {where}; {BEST_RULE}.\n\n{md}\n")
    out.with_suffix(".csv").write_text(csv_table(columns, rows))
    labels = {r.get("run"): f"run {r.get('run')}" + (f": {short_label(r['overrides'])}" if r.get("overrides") else "")
              for r in records}
    pts = [(labels[i], p[0], p[1]) for i, p in sorted(points.items()) if _finite(p[0]) and _finite(p[1])]
    png = out.with_suffix(".png")
    png.unlink(missing_ok=True)
    if not pts:
        log("no chart: no finished run has both IS and KPS (IS needs reference_images on the KPS Evaluator)")
        return md
    try:
        chart(pts, labels.get(best)).save(png)
    except ImportError:
        log("no chart: Pillow is not installed (pip install pillow); the table has every number")
    return md
