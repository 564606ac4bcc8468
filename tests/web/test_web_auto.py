"""The live view with auto preservation: the probes added (with step and drift) are named under the loss plot and
their steps marked on it."""
from __future__ import annotations

import pytest

from test_web_extension import NODE, run_view, trainer_script

RUN = trainer_script("CAT_LoraTrainer", 4, (300, 200), """
function draw() {
  const rec = { texts: [], lines: [] };
  let from = null;
  const ctx = { globalAlpha: 1, save() {}, restore() {}, beginPath() {}, stroke() {}, fillRect() {},
    moveTo(x, y) { from = [x, y]; },
    lineTo(x, y) { if (this.strokeStyle.startsWith("rgba(255,120,200")) rec.lines.push([from, [x, y]]); },
    setLineDash() {}, measureText(t) { return { width: 6 * t.length }; }, fillText(t) { rec.texts.push(String(t)); } };
  drawChart(node, ctx);
  return rec;
}
const out = {};
const none = { auto_added: [], drift: {}, measured: 0, threshold: 0.01, top_k: 2 };
const later = { auto_added: [["wolf", 5, 0.0912], ["cat", 5, 0.0226]], drift: { wolf: 0.0912, cat: 0.0226, fox: 0.004 },
                measured: 5, threshold: 0.01, top_k: 2 };
for (let s = 1; s <= 6; s++)
  api.emit("cat.train.progress", { node: "4", step: s, total: 11, loss: 1 / s, fit: 0.9 / s, keep: 0.01, lr: 1e-4,
                                   elapsed: s, auto: s < 5 ? none : later });
out.size = node.size;
out.draw = draw();
out.AUTO_H = globalThis.__catLiveView.AUTO_H;
api.emit("cat.train.progress", { node: "4", step: 1, total: 11, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 1,
  auto: none });
out.fresh = draw();
api.emit("cat.train.progress", { node: "4", step: 2, total: 11, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 2,
  auto: { ...later, auto_added: [["wolf", 5, 0.09], ["fox", 9, 0.02]], measured: 10 } });
out.two = draw();
console.log(JSON.stringify(out));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_live_view_names_the_probes_auto_preservation_added_and_marks_when(tmp_path):
    out = run_view(tmp_path, RUN)
    assert out["size"][1] == 200 + 150 + out["AUTO_H"]  # the node grew by the loss plot and the two lines
    texts = out["draw"]["texts"]
    assert "auto preservation added: wolf, cat (step 5)" in texts
    assert "checked at step 5: 2/2 added · worst of the rest fox 4e-3" in texts
    # one mark, at step 5 of 11 on the plot of the widened node (340 px): from x = 8 + 44 over 340 - 16 - 44 px
    assert len(out["draw"]["lines"]) == 1
    (x0, _), (x1, _) = out["draw"]["lines"][0]
    assert x0 == x1 == pytest.approx(52 + 280 * 4 / 10)
    assert "auto preservation: nothing added yet (threshold 0.01)" in out["fresh"]["texts"]
    assert not out["fresh"]["lines"]
    assert "auto preservation added: wolf (step 5); fox (step 9)" in out["two"]["texts"]
    assert len(out["two"]["lines"]) == 2  # a mark per step with additions


NEAREST = trainer_script("CAT_LoraTrainer", 4, (300, 200), """
const texts = [];
const ctx = { globalAlpha: 1, strokeStyle: "", save() {}, restore() {}, beginPath() {}, stroke() {}, fillRect() {},
  moveTo() {}, lineTo() {}, setLineDash() {}, measureText(t) { return { width: 6 * t.length }; },
  fillText(t) { texts.push(String(t)); } };
const auto = { auto_added: [["square", 5, 0.81]], drift: { square: 0.81, star: 0.57 }, measured: 5, threshold: 0.5,
  top_k: 8, auto_nearest: [{ class_word: "circle", probes: [["square", 0.8845], ["cross", 0.8095], ["star", 0.7715]],
                             candidates: 180, left_out: 5609, seconds: 4.2 }] };
api.emit("cat.train.progress", { node: "4", step: 5, total: 11, loss: 1, fit: 1, keep: 0.1, lr: 1e-4, elapsed: 5,
                                 auto });
drawChart(node, ctx);
const v = globalThis.__catLiveView;
console.log(JSON.stringify({ texts, size: node.size, AUTO_H: v.AUTO_H, NEAREST_H: v.NEAREST_H }));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_live_view_names_the_probes_nearest_chose_with_their_similarity(tmp_path):
    out = run_view(tmp_path, NEAREST)
    assert "nearest to circle: square 0.88, cross 0.81, star 0.77" in out["texts"]
    assert out["size"][1] == 200 + 150 + out["AUTO_H"] + out["NEAREST_H"] and out["NEAREST_H"] == 15  # one line more
