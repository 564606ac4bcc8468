"""Issue 32: after a resume the live view's it/s and ETA count only this run's steps (a run resumed at step 300 of
1000 showed 140 it/s and ETA 0:34 instead of about an hour)."""
from __future__ import annotations

import pytest

from test_web_extension import NODE, run_view, trainer_script

RUN = trainer_script("CAT_LoraTrainer", 4, (300, 200), """
function texts() {
  const rec = [];
  const ctx = new Proxy({ measureText(t) { return { width: 6 * t.length }; }, fillText(t) { rec.push(String(t)); } },
    { get: (o, k) => (k in o ? o[k] : () => {}), set: () => true });
  drawChart(node, ctx);
  return rec;
}
const out = {};
const ev = (step, elapsed, extra) => api.emit("cat.train.progress", { node: "4", step, total: 1000, loss: 1, fit: 1,
  keep: 0, lr: 1e-4, elapsed, ...extra });
for (let s = 301; s <= 304; s++) ev(s, s - 300, { first_step: 300 });  // this run's 4 steps in 4 s
out.resumed = texts();
ev(1000, 700, { first_step: 300 });
out.done = texts();
for (let s = 301; s <= 304; s++) ev(s, s - 300, {});  // a server without first_step: the first event's step says it
out.older = texts();
for (let s = 1; s <= 4; s++) ev(s, s / 2, { first_step: 0 });  // a fresh run
out.fresh = texts();
console.log(JSON.stringify(out));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_it_per_s_and_eta_after_a_resume_count_this_runs_steps(tmp_path):
    out = run_view(tmp_path, RUN)
    assert "step 304/1000 · 1.00 it/s · ETA 11:36" in out["resumed"], out["resumed"]  # was 76.00 it/s, ETA 0:09
    assert "done: 700 steps (resumed at 300) in 11:40 · 1.00 it/s" in out["done"], out["done"]
    assert "step 304/1000 · 1.00 it/s · ETA 11:36" in out["older"], out["older"]
    assert "step 4/1000 · 2.00 it/s · ETA 8:18" in out["fresh"], out["fresh"]



CANCEL = trainer_script("CAT_LoraTrainer", 4, (300, 200), """
function texts() {
  const rec = [];
  const ctx = new Proxy({ measureText(t) { return { width: 6 * t.length }; }, fillText(t) { rec.push(String(t)); } },
    { get: (o, k) => (k in o ? o[k] : () => {}), set: () => true });
  drawChart(node, ctx);
  return rec;
}
const out = {};
for (let s = 1; s <= 4; s++) api.emit("cat.train.progress", { node: "4", step: s, total: 10, loss: 1, fit: 1, keep: 0,
  lr: 1e-4, elapsed: s, first_step: 0 });
api.emit("cat.train.stopped", { node: "4", checkpoint: "/out/cat_checkpoints/cat_run/cat-step000004.pt",
  resume_from: "cat_run/cat-step000004.pt" });
api.emit("execution_interrupted", { node_id: "4" });
out.cancelled = texts();
api.emit("cat.train.progress", { node: "4", step: 5, total: 10, loss: 1, fit: 1, keep: 0, lr: 1e-4, elapsed: 1,
  first_step: 4 });
out.resumed = texts();
console.log(JSON.stringify(out));
""")


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_after_cancel_the_node_shows_what_to_type_into_resume_from(tmp_path):
    out = run_view(tmp_path, CANCEL)
    assert "cancelled at step 4/10 · resume_from cat_run/cat-step000004.pt" in out["cancelled"], out["cancelled"]
    assert not any("resume_from" in t for t in out["resumed"])  # the resumed run is a new run
