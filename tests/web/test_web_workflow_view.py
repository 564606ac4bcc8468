"""web/cat_workflow_view.js in Node.js with stub `app`/`api` modules and a canvas whose blank-box zoom is the editor's
default (8 px / 14 px): a graph with this pack's nodes that the editor opened zoomed out to blank boxes (the template
browser fits templates to the screen) gets its saved, readable view; nothing else is touched."""
from __future__ import annotations

import pytest

from test_web_extension import NODE, run_view

SCRIPT = """
import { app } from "./scripts/app.js";
const settings = {};
app.extensionManager = { setting: { get: (id) => settings[id] } };
// LGraphCanvas as far as the view goes: low_quality follows the scale when the view is computed
function canvas(scale) {
  const c = { viewport: null, dirty: 0, setDirty() { this.dirty++; }, _low: false,
    get low_quality() { return this._low; } };
  c.ds = { scale, offset: [-900, -400], computeVisibleArea() { c._low = this.scale < 8 / 14; } };
  return c;
}
await import("./extensions/ComfyUI-CAT/cat_workflow_view.js");
const ext = app.exts[0];
const saved = { scale: 0.8, offset: [60, 90] };
async function open(types, scale, ds = saved) {
  app.canvas = canvas(scale);
  app.graph = { extra: { ds }, nodes: types.map((type) => ({ type })) };
  await ext.afterConfigureGraph([]);
  return { scale: app.canvas.ds.scale, offset: app.canvas.ds.offset };
}
const out = {};
out.fitted = await open(["Note", "CAT_LoraTrainer"], 0.41);  // the template browser's fit: blank boxes
out.readable = await open(["CAT_LoraTrainer"], 0.7);  // the editor's view is readable: left alone
out.notOurs = await open(["KSampler"], 0.41);
out.savedBlank = await open(["CAT_LoraTrainer"], 0.41, { scale: 0.5, offset: [0, 0] });
out.noSaved = await open(["CAT_LoraTrainer"], 0.41, null);
// frontend 1.58 fits the view in a task of its own after the load returned: the next frames put the saved view back
const frames = [];
globalThis.requestAnimationFrame = (f) => frames.push(f);
const run = (n) => { for (let i = 0; i < n && frames.length; i++) frames.shift()(); };
await open(["CAT_LoraTrainer"], 0.8);
run(2);
app.canvas.ds.scale = 0.41; app.canvas.ds.offset = [-900, -400];  // the editor's late fit
run(3);
out.lateFit = { scale: app.canvas.ds.scale, offset: app.canvas.ds.offset };
app.canvas.ds.scale = 0.7;  // the user zooms: a readable view is left alone
run(100);
out.afterUser = app.canvas.ds.scale;
out.framesLeft = frames.length;  // and the checks stop
settings["Comfy.EnableWorkflowViewRestore"] = false;
out.userOff = await open(["CAT_LoraTrainer"], 0.41);
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_a_template_fitted_to_blank_boxes_opens_at_its_saved_view(tmp_path):
    out = run_view(tmp_path, SCRIPT, "cat_workflow_view.js")
    assert out["fitted"] == {"scale": 0.8, "offset": [60, 90]}
    untouched = {"scale": 0.41, "offset": [-900, -400]}
    assert out["readable"] == {"scale": 0.7, "offset": [-900, -400]}
    assert out["notOurs"] == untouched and out["savedBlank"] == untouched and out["noSaved"] == untouched
    assert out["lateFit"] == {"scale": 0.8, "offset": [60, 90]} and out["afterUser"] == 0.7 and out["framesLeft"] == 0
    assert out["userOff"] == untouched  # the user turned view restoring off
