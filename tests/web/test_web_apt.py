"""The live view with APT: the per-bin overfitting indicator from the progress events is drawn under the loss plot."""
from __future__ import annotations

import pytest

from test_web_extension import NODE, run_view, trainer_script

RUN = trainer_script("CAT_LoraTrainer", 4, (300, 200), """
function draw() {
  const rec = { texts: [], rects: [] };
  const ctx = { globalAlpha: 1, save() {}, restore() {}, beginPath() {}, moveTo() {}, lineTo() {}, stroke() {},
    setLineDash() {}, measureText(t) { return { width: 6 * t.length }; },
    fillRect(x, y, w, h) { rec.rects.push({ x, y, w, h, color: this.fillStyle, alpha: this.globalAlpha }); },
    fillText(t) { rec.texts.push(String(t)); } };
  drawChart(node, ctx);
  return rec;
}
const out = {};
const apt = { indicator: [0.5, 0.25, null, 0.0], fit_weight: [0.5, 0.75, 1, 1], augment_prob: [0.5, 0.25, 0, 0],
              stabilize: 0.01, align: 0.001 };
for (let s = 1; s <= 3; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 10, loss: 1 / s, fit: 0.9 / s, keep: 0.01, lr: 1e-4,
                                   elapsed: s, apt });
out.size = node.size;
out.apt = draw();
out.APT_H = globalThis.__catLiveView.APT_H;
api.emit("cat.train.progress", { node: "5", step: 1, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 1 });
console.log(JSON.stringify(out));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_live_view_draws_the_apt_indicator_per_bin(tmp_path):
    out = run_view(tmp_path, RUN)
    assert out["size"][1] == 200 + 150 + out["APT_H"]  # the node grew by the loss plot and the indicator band
    texts = out["apt"]["texts"]
    assert "APT overfitting indicator per timestep bin, t 0 → T · max 0.50 in bin 1 (weight 0.50, aug 0.50)" in texts
    # one bar per drawn bin (the never-drawn bin has none), heights in proportion to the indicator
    band = max((r for r in out["apt"]["rects"] if r["color"].startswith("rgba(0,0,0")), key=lambda r: r["y"])
    bars = [r for r in out["apt"]["rects"] if r["color"].startswith("rgb(") and r["y"] >= band["y"]]
    assert len(bars) == 3
    heights = [round(b["h"] / band["h"], 3) for b in sorted(bars, key=lambda b: b["x"])]
    assert heights == [0.5, 0.25, 0.0]
