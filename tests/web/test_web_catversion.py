"""The live view on the CatVersion Trainer: its progress events (the LoRA trainer's, tests/comfy) draw the chart."""
from __future__ import annotations

import pytest

from test_web_extension import CURVES, NODE, run_view, trainer_script

RUN = trainer_script("CAT_CatVersionTrainer", 10, (380, 420), """
function draw() {
  const rec = { texts: [], strokes: [] };
  const ctx = { globalAlpha: 1, dash: [], save() {}, restore() {}, fillRect() {}, beginPath() {}, moveTo() {},
    lineTo() {},
    setLineDash(d) { this.dash = d; }, measureText(t) { return { width: 6 * t.length }; },
    stroke() { rec.strokes.push({ color: this.strokeStyle, alpha: this.globalAlpha }); },
    fillText(t) { rec.texts.push(String(t)); } };
  drawChart(node, ctx);
  return rec;
}
const out = { idle: draw() };
for (let s = 1; s <= 2; s++)
  api.emit("cat.train.progress", { node: "10", prompt_id: "p", step: s, total: 5, loss: 0.4 / s, fit: 0.3 / s,
                                   keep: 0.02, lr: 1e-2, elapsed: s });
out.size = node.size;
out.running = draw();
console.log(JSON.stringify(out));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_catversion_trainer_draws_the_live_chart(tmp_path):
    out = run_view(tmp_path, RUN)
    assert out["idle"] == {"texts": [], "strokes": []}  # never trained: nothing drawn
    assert out["size"][1] == 420 + 150  # grew by the plot height
    texts = out["running"]["texts"]
    assert "step 2/5 · 1.00 it/s · ETA 0:03" in texts and {"loss", "fit", "keep"} <= set(texts)
    drawn = {CURVES[s["color"]] for s in out["running"]["strokes"] if s["color"] in CURVES}
    assert drawn == {"loss", "fit", "keep"}
