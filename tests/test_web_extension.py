"""The web extension in Node.js with stub `app`/`api` modules: idle it draws nothing; fed progress
events it draws the curve and prints step, it/s and ETA computed from the events."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = shutil.which("node")

STUBS = {
    "scripts/app.js": """
export const app = { exts: [], dirty: 0, nodes: {},
  registerExtension(e) { this.exts.push(e); },
  graph: { getNodeById(id) { return app.nodes[id] ?? null; }, setDirtyCanvas() { app.dirty++; } } };
""",
    "scripts/api.js": """
export const api = { handlers: {}, addEventListener(n, f) { (this.handlers[n] ??= []).push(f); },
  emit(n, detail) { for (const f of this.handlers[n] ?? []) f({ detail }); } };
""",
    "run.mjs": """
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
await import("./extensions/ComfyUI-CAT/cat_live_view.js");
const ext = app.exts[0];
ext.setup();
function Node() {}
let baseDraws = 0;
Node.prototype.onDrawForeground = function () { baseDraws++; };
await ext.beforeRegisterNodeDef(Node, { name: "CAT_LoraTrainer" });
function Other() {}
await ext.beforeRegisterNodeDef(Other, { name: "KSampler" });
const node = Object.assign(new Node(), { id: 4, size: [300, 200], flags: {},
  computeSize() { return [300, 200]; }, setSize(s) { this.size = s; }, setDirtyCanvas() {} });
app.nodes[4] = node;
const texts = [], strokes = [];
const ctx = { save() {}, restore() {}, fillRect() {}, beginPath() {}, moveTo() {}, lineTo() {}, stroke() { strokes.push(1); },
  fillText(t) { texts.push(t); } };
node.onDrawForeground(ctx);
const idle = { texts: texts.length, strokes: strokes.length, baseDraws, otherPatched: Other.prototype.onDrawForeground !== undefined };
api.emit("cat.train.progress", { node: "99", step: 1, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 0.5 });
for (let s = 1; s <= 4; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 10, loss: 1 / s, fit: 1 / s, keep: 0.01, lr: 1e-4, elapsed: s * 0.5 });
node.onDrawForeground(ctx);
console.log(JSON.stringify({ idle, texts, strokes: strokes.length, size: node.size, baseDraws }));
""",
}


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_live_view_draws_from_events(tmp_path):
    for rel, text in STUBS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "extensions" / "ComfyUI-CAT").mkdir(parents=True)
    shutil.copy(ROOT / "web" / "cat_live_view.js", tmp_path / "extensions" / "ComfyUI-CAT" / "cat_live_view.js")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    r = subprocess.run([NODE, "run.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["idle"] == {"texts": 0, "strokes": 0, "baseDraws": 1, "otherPatched": False}  # idle: nothing drawn
    assert out["baseDraws"] == 2  # the node's own drawing still runs
    assert out["strokes"] == 2  # raw and smoothed curves
    assert out["texts"][-2] == "step 4/10 · 2.00 it/s · ETA 0:03"  # 4 steps in 2 s; 6 left at 2 it/s
    assert out["texts"][-1].startswith("loss 0.25000 (smoothed ")
    assert out["size"][1] == 350  # grew by the plot height
