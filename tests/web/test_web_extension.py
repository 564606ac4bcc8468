"""The web extension in Node.js with stub `app`/`api` modules: idle it draws nothing; fed progress
events it draws the curves, y ticks, a legend, step, it/s and ETA computed from the events; ComfyUI's
execution events end a run as done, cancelled or failed, drawn dimmed and without an ETA."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

STUBS = {
    "scripts/app.js": """
export const app = { exts: [], dirty: 0, nodes: {},
  registerExtension(e) { this.exts.push(e); },
  graph: { getNodeById(id) { return app.nodes[id] ?? null; }, setDirtyCanvas() { app.dirty++; } } };
""",
    "nodes.mjs": """
// A graph node as the live view sees it: widgets, addCustomWidget (LiteGraph appends), computeSize (the node's own
// `h` plus each widget's height, as LGraphNode.computeSize sums them), setSize.
export function makeNode(type, id, w, h) {
  return { id, type, comfyClass: type, size: [w, h], flags: {}, widgets: [],
    addCustomWidget(x) { this.widgets.push(x); return x; },
    computeSize() { return [w, h + this.widgets.reduce((a, x) => a + (x.computeSize?.(this.size[0])[1] ?? 20), 0)]; },
    setSize(s) { this.size = s; }, setDirtyCanvas() {} };
}
// What the editor does to draw the chart widget: its draw(ctx, node, width, y) at its place under the node's own
// widgets.
export function drawChart(node, ctx) {
  const w = node.widgets.find((x) => x.name === "cat_live_view");
  w?.draw(ctx, node, node.size[0], node.size[1] - w.computeSize(node.size[0])[1]);
}
""",
    "scripts/api.js": """
export const api = { handlers: {}, addEventListener(n, f) { (this.handlers[n] ??= []).push(f); },
  emit(n, detail) { for (const f of this.handlers[n] ?? []) f({ detail }); } };
""",
    "run.mjs": """
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
import { makeNode, drawChart } from "./nodes.mjs";
const view = await import("./extensions/ComfyUI-CAT/cat_live_view.js");
const ext = app.exts[0];
ext.setup();
const node = makeNode("CAT_LoraTrainer", 4, 300, 200);
const other = makeNode("KSampler", 7, 300, 200);
app.nodes[4] = node; app.nodes[7] = other;

// A canvas context that records what was drawn: texts, and each stroke with its colour, dash and alpha.
function recorder() {
  const rec = { texts: [], strokes: [] };
  const ctx = { globalAlpha: 1, dash: [], save() {}, restore() {}, fillRect() {}, beginPath() {}, moveTo() {},
    lineTo() {},
    setLineDash(d) { this.dash = d; }, measureText(t) { return { width: 6 * t.length }; },
    stroke() { rec.strokes.push({ color: this.strokeStyle, alpha: this.globalAlpha, dash: this.dash.join(",") }); },
    fillText(t) { rec.texts.push(String(t)); } };
  return [ctx, rec];
}
function draw() { const [ctx, rec] = recorder(); drawChart(node, ctx); return rec; }

const out = {};
const idle = draw();
out.idle = { texts: idle.texts.length, strokes: idle.strokes.length, widgets: node.widgets.length,
  hooks: Object.keys(ext).filter((k) => k !== "name") };
api.emit("cat.train.progress", { node: "99", step: 1, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 0.5 });
api.emit("cat.train.progress", { node: "7", step: 1, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 0.5 });
out.otherWidgets = other.widgets.length;
for (let s = 1; s <= 4; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 10, loss: 1 / s, fit: 0.9 / s, keep: 0.01, lr: 1e-4,
                                   elapsed: s * 0.5 });
out.size = node.size;
const chart = node.widgets.find((w) => w.name === globalThis.__catLiveView.CHART);
out.widget = { count: node.widgets.length, type: chart.type, serialize: chart.serialize, options: chart.options,
  height: chart.computeSize(340)[1] };
out.running = draw();
api.emit("execution_interrupted", { prompt_id: "p", node_id: "4", node_type: "CAT_LoraTrainer" });
out.cancelled = draw();
api.emit("executing", null);  // the server's "finished" after an interrupt must not turn it into "done"
out.afterExecutingNull = draw().texts;
for (let s = 1; s <= 2; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 10, loss: 0.5, fit: 0.5, keep: 0, lr: 1e-4, elapsed: s });
out.restarted = draw().texts;
api.emit("execution_error", { prompt_id: "p", node_id: "4", node_type: "CAT_LoraTrainer",
  exception_message: "CUDA out of memory\\nmore lines" });
out.failed = draw().texts;
for (let s = 1; s <= 3; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 3, loss: 0.2, fit: 0.1, keep: 0.1, lr: 1e-4,
                                   elapsed: s * 2 });
api.emit("execution_success", { prompt_id: "p" });
out.done = draw().texts;
for (let s = 1; s <= 2; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 9, loss: 0.2, fit: 0.1, keep: 0.1, lr: 1e-4,
                                   elapsed: s });
api.emit("status", { exec_info: { queue_remaining: 0 } });  // another tab queued it: an empty queue ends it
out.otherTab = draw().texts;
out.state = globalThis.__catLiveView.runs.get("4").state;
out.widgetsAfterRuns = node.widgets.length;
// a run with validation rows: the step-0 row arrives before the first training step
api.emit("cat.train.validation", { node: "4", step: 0, total: 4, fit: 0.4, keep_drift: 0, probe_drift: 0 });
for (let s = 1; s <= 4; s++) {
  api.emit("cat.train.progress", { node: "4", step: s, total: 4, loss: 0.5 / s, fit: 0.4 / s, keep: 0.01, lr: 1e-4,
                                   elapsed: s });
  if (s % 2 === 0) api.emit("cat.train.validation", { node: "4", step: s, total: 4, fit: 0.3 / s,
                                                      keep_drift: 0.01 * s, probe_drift: 0.02 * s });
}
const v = draw();
const run4 = globalThis.__catLiveView.runs.get("4");
out.validated = { texts: v.texts, strokes: v.strokes.map((x) => x.color), rows: run4.validation.length,
  points: run4.loss.length };
out.axes = [[0.0107, 1.07], [0.05, 1.1], [0.1, 0.5], [1.07, 1.0700001], [0.0101, 0.0123], [1e-7, 1], [1.1e-4, 1.1]]
  .map((r) => view.yAxis(r));
console.log(JSON.stringify(out));
""",
}


def trainer_script(node_type: str, node_id: int, size: tuple[int, int], body: str) -> str:
    """A run.mjs for run_view: the extension set up on one trainer node of `node_type` (its own height `size[1]`, the
    chart's widget added under it), then `body` (which defines draw(), emits events and prints its JSON)."""
    w, h = size
    return f"""
import {{ app }} from "./scripts/app.js";
import {{ api }} from "./scripts/api.js";
import {{ makeNode, drawChart }} from "./nodes.mjs";
await import("./extensions/ComfyUI-CAT/cat_live_view.js");
const ext = app.exts[0];
ext.setup();
const node = makeNode("{node_type}", {node_id}, {w}, {h});
app.nodes[{node_id}] = node;
""" + body


def run_view(tmp_path, script: str | None = None, extension: str = "cat_live_view.js"):
    """Runs `script` (default: this file's run.mjs) in Node.js against the stubs and the shipped extension file
    `web/<extension>`; its JSON."""
    for rel, text in {**STUBS, **({"run.mjs": script} if script else {})}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "extensions" / "ComfyUI-CAT").mkdir(parents=True)
    shutil.copy(ROOT / "web" / extension, tmp_path / "extensions" / "ComfyUI-CAT" / extension)
    (tmp_path / "package.json").write_text('{"type": "module"}')
    r = subprocess.run([NODE, "run.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


CURVES = {"rgb(110,160,255)": "loss", "rgb(255,170,60)": "fit", "rgb(90,210,120)": "keep"}


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_live_view_draws_and_ends_runs(tmp_path):
    out = run_view(tmp_path)
    # idle: no chart, nothing drawn, no node type patched (the chart is a widget added by the node's first event)
    assert out["idle"] == {"texts": 0, "strokes": 0, "widgets": 0, "hooks": ["setup"]}
    assert out["otherWidgets"] == 0  # events for a node that is no trainer (or not in the graph) add nothing
    assert out["size"] == [340, 350]  # grew by the chart widget's height, to the live view's minimum width
    # a widget of its own type (drawn by LiteGraph and by Nodes 2.0), never saved with the graph nor sent to the server
    assert out["widget"] == {"count": 1, "type": "cat_live_view", "serialize": False, "options": {"serialize": False},
                             "height": 150}
    run = out["running"]
    assert "step 4/10 · 2.00 it/s · ETA 0:03" in run["texts"]  # 4 steps in 2 s; 6 left at 2 it/s
    curves = [s for s in run["strokes"] if s["color"] in CURVES and s["alpha"] == 1]
    # the three smoothed curves (legend swatches stroke the same colours once more), each its own dash
    assert sorted({CURVES[s["color"]] for s in curves}) == ["fit", "keep", "loss"]
    assert len({s["dash"] for s in curves}) == 3
    assert {"loss", "fit", "keep"} <= set(run["texts"])  # the legend
    ticks = [t for t in run["texts"] if t.replace(".", "").replace("e-", "").replace("e+", "").isdigit()]
    assert 3 <= len(ticks) <= 5 and len(set(ticks)) == len(ticks), ticks
    assert any(t.startswith("smoothed loss ") for t in run["texts"])

    cancelled = out["cancelled"]
    assert "cancelled at step 4/10" in cancelled["texts"]
    assert not any("ETA" in t or "it/s" in t for t in cancelled["texts"])
    dimmed = [s for s in cancelled["strokes"] if CURVES.get(s["color"]) == "loss"]
    assert dimmed and dimmed[0]["alpha"] < 1  # the curve is dimmed once the run ended
    assert "cancelled at step 4/10" in out["afterExecutingNull"]
    assert "step 2/10 · 1.00 it/s · ETA 0:08" in out["restarted"]  # a new run replaces the ended one
    assert "keep" not in out["restarted"]  # all-zero keep (cat_factor 0) is left out of plot and legend
    assert "failed at step 2/10: CUDA out of memory" in out["failed"]
    assert "done: 3 steps in 0:06 · 0.50 it/s" in out["done"]
    assert "stopped at step 2/9" in out["otherTab"] and out["state"] == "stopped"
    assert out["widgetsAfterRuns"] == 1  # one chart widget however many runs


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_live_view_draws_validation_next_to_the_loss(tmp_path):
    v = run_view(tmp_path)["validated"]
    assert v["rows"] == 3 and v["points"] == 4  # the step-0 row started the run; training steps continued it
    assert {"val fit", "keep drift", "probe drift", "loss"} <= set(v["texts"])  # legend
    for color in ("rgb(240,110,200)", "rgb(190,140,255)", "rgb(120,220,230)"):  # each validation curve stroked
        assert color in v["strokes"]


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_y_axis_ticks_are_few_distinct_and_compact(tmp_path):
    axes = run_view(tmp_path)["axes"]
    # 1.07e-2..1.07 (the example) spans two decades: log scale, 1-3-10 ticks
    assert axes[0]["log"] and axes[0]["labels"] == ["0.03", "0.1", "0.3", "1"]
    assert axes[1]["labels"] == ["0.1", "0.3", "1"]
    assert not axes[2]["log"] and axes[2]["labels"] == ["0.1", "0.2", "0.3", "0.4", "0.5"]
    assert axes[3]["labels"] == ["1", "1.1"]  # a flat curve still gets an axis, labels never repeat
    assert axes[4]["labels"] == ["0.011", "0.012"]
    assert axes[5]["labels"] == ["1e-4", "1e-3", "0.01", "0.1", "1"]  # at most 4 decades: keep's ~0 start is clamped
    assert axes[6]["labels"] == ["1e-3", "0.01", "0.1", "1"]  # a CAT run's first steps: loss ~1, keep ~1e-4
    for a in axes:
        assert len(set(a["labels"])) == len(a["labels"]) and all(len(t) <= 5 for t in a["labels"])


PREVIEW_FIRST = trainer_script("CAT_LoraTrainer", 4, (380, 600), """
// a preview already on the node when the first event comes (a page reloaded during a run): the chart goes above it
node.widgets.push({ name: "rank" },
                  { name: "$$canvas-image-preview", computeLayoutSize() { return { minHeight: 220 }; } });
api.emit("cat.train.progress", { node: "4", step: 1, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 1 });
api.emit("cat.train.progress", { node: "4", step: 2, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 2 });
console.log(JSON.stringify({ order: node.widgets.map((w) => w.name) }));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_chart_is_laid_out_above_a_preview_already_on_the_node(tmp_path):
    assert run_view(tmp_path, PREVIEW_FIRST)["order"] == ["rank", "cat_live_view", "$$canvas-image-preview"]
