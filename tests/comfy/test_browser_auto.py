"""Auto preservation in a real browser: a tiny run queued from the page with an Auto Preservation node on the Loss
Config; when it is done the trainer's live view names the probes it added, with their step, and marks the step on
the chart. The screenshot is docs/auto_preservation_live_view.png (copied from pytest's temp dir; run with -s)."""
from __future__ import annotations

from test_browser import QUEUE_API, _focus, _wait, browser, editor, shots, tiny_run  # noqa: F401  (fixtures)
from test_browser import pytestmark  # noqa: F401  (the same skips: playwright, Chromium, the frontend)
from test_server import server  # noqa: F401

DRAWN = """(id) => { const texts = [], ctx = app.canvas.ctx, fill = ctx.fillText;
  ctx.fillText = function (t, ...a) { texts.push(String(t)); return fill.call(this, t, ...a); };
  try { app.canvas.draw(true, true); } finally { ctx.fillText = fill; }
  return texts; }"""


def test_live_view_names_the_probes_auto_preservation_added(editor, server, shots):  # noqa: F811
    _, info, _ = server
    g = tiny_run(info, 12, 3, "browser_auto")
    g["6"] = {"class_type": "CAT_AutoPreservation", "inputs": {"every": 4, "source": "list", "probes": "cat\nwolf\ncar",
                                                               "top_k": 2, "threshold": 0.0, "points": 2}}
    g["3"]["inputs"]["auto"] = ["6", 0]
    editor.evaluate(QUEUE_API, g)
    st = _wait(editor, "4", lambda s: s["state"] != "running" and s["step"] == s["total"], 240, "the 12-step auto run")
    assert st["state"] == "done", st
    auto = editor.evaluate("() => window.__catLiveView.runs.get('4').auto")
    added = auto["auto_added"]
    assert [s for _, s, _ in added] == [4, 4] and {p for p, _, _ in added} <= {"cat", "wolf", "car"}
    drawn = editor.evaluate(DRAWN, "4")
    line = next((t for t in drawn if t.startswith("auto preservation added: ")), None)
    assert line == f"auto preservation added: {added[0][0]}, {added[1][0]} (step 4)", drawn
    assert any(t.startswith("checked at step 4: 2/2 added") for t in drawn), drawn  # a spent budget: no more checks
    clip = _focus(editor, "4")
    shot = shots / "auto_preservation_live_view.png"
    editor.screenshot(path=str(shot), clip=clip)
    print(f"auto preservation live view: {shot}")
    assert editor.errors == []
