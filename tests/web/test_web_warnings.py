"""web/cat_warnings.js in Node.js with stub `app`/`api` modules: each `cat.warning` text becomes a toast."""
from __future__ import annotations


import pytest

from test_web_extension import NODE, run_view

SCRIPT = """
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
const toasts = [];
app.extensionManager = { toast: { add(t) { toasts.push(t); } } };
console.warn = () => {};
await import("./extensions/ComfyUI-CAT/cat_warnings.js");
for (const e of app.exts) e.setup?.();
api.emit("cat.warning", { title: "LoRA for another model family", warnings: ["node 10: first", "node 12: second"] });
api.emit("cat.warning", {});
console.log(JSON.stringify({ toasts, shown: globalThis.__catWarnings, names: app.exts.map((e) => e.name) }));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed; the web extension test needs `node`")
def test_each_warning_is_one_toast(tmp_path):
    out = run_view(tmp_path, SCRIPT, "cat_warnings.js")
    assert out["names"] == ["ComfyUI-CAT.warnings"]
    assert [t["detail"] for t in out["toasts"]] == ["node 10: first", "node 12: second"]
    assert {t["severity"] for t in out["toasts"]} == {"warn"} and out["toasts"][0]["summary"] == ("LoRA for another "
                                                                                                  "model family")
    assert out["shown"] == ["node 10: first", "node 12: second"]
