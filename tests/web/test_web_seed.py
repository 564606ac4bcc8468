"""Issue 32: a trainer node added to the canvas defaults its seed to "fixed", not ComfyUI's "randomize" (every Run a
new seed, so a rerun trained another LoRA); other nodes keep theirs."""
from __future__ import annotations

import pytest

from test_web_extension import NODE, run_view

SCRIPT = """
import { app } from "./scripts/app.js";
await import("./extensions/ComfyUI-CAT/cat_seed.js");
const ext = app.exts[0];
function node(type) {  // as the editor builds it: the seed widget and its linked control, set to "randomize"
  const control = { name: "control_after_generate", value: "randomize" };
  const seed = { name: "seed", value: 0, linkedWidgets: [control] };
  return { type, comfyClass: type, widgets: [seed, control], control };
}
const out = {};
for (const t of ["CAT_LoraTrainer", "CAT_CatVersionTrainer", "KSampler"]) {
  const n = node(t);
  ext.nodeCreated(n);
  out[t] = n.control.value;
}
const bare = { type: "CAT_LoraTrainer", comfyClass: "CAT_LoraTrainer", widgets: [{ name: "seed", value: 0 }] };
ext.nodeCreated(bare);  // a frontend without the control widget: nothing to set, nothing thrown
out.bare = bare.widgets.length;
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_a_new_trainer_node_defaults_its_seed_to_fixed(tmp_path):
    out = run_view(tmp_path, SCRIPT, "cat_seed.js")
    assert out == {"CAT_LoraTrainer": "fixed", "CAT_CatVersionTrainer": "fixed", "KSampler": "randomize", "bare": 1}
