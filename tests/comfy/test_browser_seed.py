"""Issue 32, in the real editor (ComfyUI's frontend, headless Chromium): a trainer node added to the canvas defaults
its seed's "control after generate" to fixed; KSampler keeps ComfyUI's randomize. Skips as test_browser.py does
without Playwright, Chromium or the frontend package."""
from __future__ import annotations

from test_browser import browser, editor, pytestmark, server  # noqa: F401  (fixtures and skip marks)


def test_a_trainer_added_to_the_canvas_has_a_fixed_seed(editor, server):  # noqa: F811
    modes = editor.evaluate("""() => {
      const LG = globalThis.LiteGraph ?? window.LiteGraph;
      const out = {};
      for (const t of ["CAT_LoraTrainer", "CAT_CatVersionTrainer", "KSampler"]) {
        const node = LG.createNode(t);
        app.graph.add(node);
        const seed = node.widgets.find((w) => w.name === "seed");
        out[t] = (seed.linkedWidgets ?? []).map((w) => w.value);
        app.graph.remove(node);
      }
      return out; }""")
    assert modes == {"CAT_LoraTrainer": ["fixed"], "CAT_CatVersionTrainer": ["fixed"], "KSampler": ["randomize"]}, modes
