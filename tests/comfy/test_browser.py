"""The graph editor in a real browser: ComfyUI's own frontend, served by a real server with this pack,
driven in headless Chromium through Playwright's Python package (pointed at the system Chromium; no
browser download).

Each template the server lists for this pack (the shipped UI workflows) is fetched as the template browser
fetches it and loaded with app.loadGraphData: it opens at its saved, readable zoom, no missing node types, no node grown by the
editor or covering another, and app.graphToPrompt() equals the shipped .api.json input for input. Then a
tiny training run is queued from the page: the live chart is drawn, the node's progress bar moves, a
finished run reads "done", and after POST /interrupt the node shows the run as cancelled. Screenshots
land in pytest's temp dir (paths are printed; run with -s to see them).

Needs COMFYUI_PATH (see conftest.py), the `playwright` Python package, ComfyUI's frontend package and a
Chromium (CHROMIUM_PATH, or chromium / chromium-browser / google-chrome on PATH).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

import pytest

from conftest import ROOT
from test_server import server, train_graph  # noqa: F401  (the real-server fixture, and its tiny training graph)

WF = ROOT / "workflows"
UI = sorted(WF.glob("*.json"))
CHROMIUM = next((p for p in [os.environ.get("CHROMIUM_PATH")] if p and os.access(p, os.X_OK)), None) or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
try:
    import comfyui_frontend_package  # noqa: F401
    FRONTEND = True
except ImportError:
    FRONTEND = False

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="the `playwright` Python package is not installed "
                       "(pip install playwright; the system Chromium is used, no `playwright install`)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (CHROMIUM_PATH, chromium, chromium-browser, google-chrome): "
                       "install Debian's `chromium` or set CHROMIUM_PATH to a Chromium executable"),
    pytest.mark.skipif(not FRONTEND, reason="comfyui-frontend-package is not installed: no graph editor to test"),
]

READY = "window.app?.graph && window.LiteGraph?.registered_node_types?.CAT_LoraTrainer && window.__catLiveView"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def editor(browser, server):  # noqa: F811
    """The editor page, loaded and with this pack's nodes and live view registered; records page errors."""
    url = server[0]
    # a fresh user gets a template picker over the canvas, and a minimap in a corner: neither belongs in the shots
    # and zoomed out it draws nodes as empty boxes (LOD): the workflow shots should show widgets and text
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
    urllib.request.urlopen(urllib.request.Request(url + "/settings", data=json.dumps(settings).encode(), method="POST",
                                                  headers={"Content-Type": "application/json"}), timeout=10)
    page = browser.new_page(viewport={"width": 2400, "height": 1500})
    page.errors = []
    # only this pack's errors count: the editor itself logs unrelated startup errors on a fresh profile
    page.on("pageerror", lambda e: page.errors.append(f"{e}: {e.stack}") if "ComfyUI-CAT" in str(e.stack) else None)
    page.on("console", lambda m: page.errors.append(m.text) if "ComfyUI-CAT" in m.text else None)
    page.on("dialog", lambda d: (page.errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(url)
    page.wait_for_function(READY, timeout=90_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("screenshots")
    print(f"\nbrowser test screenshots: {d}")
    return d


LOAD = """async (ui) => {
  await app.loadGraphData(ui, true, true, null, {showMissingNodesDialog: false, showMissingModelsDialog: false});
  const nodes = app.graph.nodes.map((n) => ({id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
    errors: !!n.has_errors, size: Array.from(n.size), box: Array.from(n.boundingRect)}));
  const prompt = await app.graphToPrompt();
  // the view it opened at, judged with the editor's default text threshold (8 px; the fixture turns LOD off for shots)
  const lod = app.canvas.min_font_size_for_lod;
  app.canvas.min_font_size_for_lod = 8;
  const view = {scale: app.canvas.ds.scale, offset: Array.from(app.canvas.ds.offset), low_quality: app.canvas.low_quality};
  app.canvas.min_font_size_for_lod = lod;
  return {nodes, output: prompt.output, view};
}"""


# The core frontend's Preview Any adds a read-only text widget ("preview") that graphToPrompt sends along; the node's
# schema has no such input and the server ignores it.
EDITOR_ONLY = {"PreviewAny": ("preview",)}


def _overlapping(nodes: list[dict]) -> list[tuple]:
    """Pairs of nodes whose drawn boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["box"]
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["id"], a["type"], b["id"], b["type"]))
    return out


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_shipped_workflow_loads_as_its_api_graph(editor, shots, path):
    """Loaded the way the template browser loads it: listed by /workflow_templates, fetched from the server."""
    listed = editor.evaluate("async () => (await fetch('/workflow_templates')).json()")
    assert path.stem in listed["ComfyUI-CAT"], f"{path.name} is not offered in the template browser: {listed}"
    ui = editor.evaluate("async (name) => (await fetch(`/api/workflow_templates/ComfyUI-CAT/${name}.json`)).json()", path.stem)
    assert ui == json.loads(path.read_text())
    api = json.loads((WF / "api" / path.name.replace(".json", ".api.json")).read_text())
    r = editor.evaluate(LOAD, ui)
    nodes = r["nodes"]
    assert len(nodes) == len(ui["nodes"])
    missing = [(n["id"], n["type"]) for n in nodes if not n["registered"] or n["errors"]]
    assert missing == [], f"node types the editor does not know: {missing}"
    shipped = {n["id"]: n["size"] for n in ui["nodes"]}
    grown = [(n["id"], n["type"], shipped[n["id"]], n["size"]) for n in nodes if n["size"] != shipped[n["id"]]]
    assert grown == [], f"the editor resized nodes on load (shipped sizes are too small): {grown}"
    assert _overlapping(nodes) == []
    assert r["view"]["scale"] == ui["extra"]["ds"]["scale"] and not r["view"]["low_quality"], \
        f"{path.name} opens at zoom {r['view']['scale']}, where the editor draws blank boxes"
    out = r["output"]
    assert set(out) == set(api), f"prompt nodes {sorted(out)} != API graph nodes {sorted(api)}"
    for nid, node in api.items():
        assert out[nid]["class_type"] == node["class_type"]
        sent = {k: v for k, v in out[nid]["inputs"].items() if k not in EDITOR_ONLY.get(node["class_type"], ())}
        assert sent == node["inputs"], f"{path.name} node {nid} {node['class_type']}"
    # The server's own validation of the prompt the editor built: only the model files this test server
    # lacks may be refused (what a user edits first), no value in a wrong slot.
    answer = editor.evaluate("""async (prompt) => { const r = await fetch('/prompt', {method: 'POST',
      headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt})}); return await r.json(); }""", out)
    refused = sorted({(api[nid]["class_type"], e.get("extra_info", {}).get("input_name"), e["type"])
                      for nid, ne in answer.get("node_errors", {}).items() for e in ne["errors"]})
    print(f"{path.name}: server validation refused {refused}")
    assert set(refused) <= {("CheckpointLoaderSimple", "ckpt_name", "value_not_in_list"),
                            ("UNETLoader", "unet_name", "value_not_in_list"), ("VAELoader", "vae_name", "value_not_in_list"),
                            ("DualCLIPLoader", "clip_name1", "value_not_in_list"),
                            ("DualCLIPLoader", "clip_name2", "value_not_in_list"),
                            ("CAT_KPSEvaluator", "clip_checkpoint", "value_not_in_list")}, answer
    assert refused, "the test server has none of the shipped model files, so validation must name them"
    editor.evaluate("() => { app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; }")
    editor.evaluate("() => { const b = app.graph.nodes.map((n) => n.boundingRect); const x0 = Math.min(...b.map((r) => r[0])),"
                    " y0 = Math.min(...b.map((r) => r[1])), x1 = Math.max(...b.map((r) => r[0] + r[2])),"
                    " y1 = Math.max(...b.map((r) => r[1] + r[3])); app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0]);"
                    " app.graph.setDirtyCanvas(true, true); }")
    editor.wait_for_timeout(300)
    shot = shots / f"{path.stem}.png"
    editor.screenshot(path=str(shot))
    print(f"{path.name}: {len(nodes)} nodes, screenshot {shot}")
    assert editor.errors == []


def _run_state(page, node_id: str) -> dict | None:
    return page.evaluate("""(id) => { const r = window.__catLiveView.runs.get(id); const n = app.graph.getNodeById(Number(id));
      return r ? {state: r.state, step: r.step, total: r.total, points: r.loss.length, message: r.message,
                  progress: n?.progress ?? null, height: n?.size[1]} : null; }""", node_id)


def _wait(page, node_id: str, cond, timeout: float, what: str) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _run_state(page, node_id)
        if st and cond(st):
            return st
        time.sleep(0.1)
    history = page.evaluate("async () => (await fetch('/history?max_items=1')).json()")
    status = [h.get("status") for h in history.values()]
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; live view state: {_run_state(page, node_id)}; "
                         f"last prompt's status: {status}; page errors: {page.errors}")


def _chart_pixels(page, node_id: str, colours: list[list[int]] | None = None, tol: int = 25) -> int:
    """Pixels inside the trainer's chart area on the canvas within `tol` of one of `colours` in every channel
    (None: the live view's validation colours: val fit, keep drift, probe drift)."""
    return page.evaluate("""({id, colours, tol}) => {
      const n = app.graph.getNodeById(Number(id)), c = app.canvas, H = window.__catLiveView.PLOT_H;
      c.draw(true, true);
      const [x0, y0] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] + n.size[1] - H]);
      const [x1, y1] = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
      const d = c.canvas.getContext("2d").getImageData(Math.round(x0), Math.round(y0), Math.round(x1 - x0), Math.round(y1 - y0)).data;
      const cols = colours ?? window.__catLiveView.VALIDATION.map((s) => s.color.match(/\\d+/g).map(Number));
      let k = 0;
      for (let i = 0; i < d.length; i += 4)
        if (cols.some(([r, g, b]) => Math.abs(d[i] - r) < tol && Math.abs(d[i + 1] - g) < tol && Math.abs(d[i + 2] - b) < tol)) k++;
      return k;
    }""", {"id": node_id, "colours": colours, "tol": tol})


LOSS_COLOUR = [[110, 160, 240]]  # the loss curve, rgb(110,160,255); with tol 40: blue above 200, as anti-aliasing leaves it


def _focus(page, node_id: str) -> dict:
    """Zoom 1, the node near the canvas' top left; returns its screen clip (title bar included)."""
    return page.evaluate("""(id) => {
      const n = app.graph.getNodeById(Number(id)), c = app.canvas;
      c.ds.scale = 1; c.ds.offset = [120 - n.pos[0], 160 - n.pos[1]]; c.draw(true, true);
      const r = c.canvas.getBoundingClientRect();
      return {x: r.left + 110, y: r.top + 160 - 40, width: n.size[0] + 20, height: n.size[1] + 50};
    }""", node_id)


QUEUE_API = """async (g) => { await app.loadApiJson(g, "cat-browser-test"); await app.queuePrompt(0); }"""


def tiny_run(info: dict, steps: int, seed: int, name: str) -> dict:
    """The server test's tiny training graph, its trainer inputs checked against the server's schema:
    a value the schema no longer accepts (a widget that changed type) falls back to the default."""
    g = train_graph(steps=steps, seed=seed, checkpoint_name=name, save_name=name)
    spec = {**info["CAT_LoraTrainer"]["input"]["required"], **info["CAT_LoraTrainer"]["input"].get("optional", {})}
    inputs = g["4"]["inputs"]
    for k in list(inputs):
        if k not in spec:
            del inputs[k]
    for k, s in spec.items():
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        choices = s[0] if isinstance(s[0], list) else opts.get("options") if s[0] == "COMBO" else None
        if k not in inputs or (choices is not None and inputs[k] not in choices):
            inputs[k] = opts.get("default", choices[0] if choices else None)
    return g


def test_training_from_the_page_draws_live_view_and_shows_cancel(editor, server, shots):  # noqa: F811
    url, info, _ = server
    # A short run to its end: every step drawn, the node reads "done".
    editor.evaluate(QUEUE_API, tiny_run(info, 12, 1, "browser_done"))
    st = _wait(editor, "4", lambda s: s["state"] != "running" and s["step"] == s["total"], 180, "the 12-step run to finish")
    assert st["state"] == "done" and st["points"] == 12, st
    assert st["height"] >= 454 + 150  # the node grew to hold the chart under its widgets

    # A long run, cancelled from the API: the chart is drawn, the progress bar moves, then "cancelled".
    editor.evaluate(QUEUE_API, tiny_run(info, 5000, 2, "browser_cancel"))
    first = _wait(editor, "4", lambda s: s["state"] == "running" and s["total"] == 5000 and s["step"] >= 3
                  and s["progress"] is not None, 180, "the long run's third step")
    # 40 steps give the screenshot a curve worth looking at (the README shows it)
    later = _wait(editor, "4", lambda s: s["step"] >= max(first["step"] + 5, 40) and s["progress"] is not None, 180,
                  "step 40")
    assert 0 < first["progress"] < later["progress"] < 1, (first, later)  # ComfyUI's own progress bar on the node
    clip = _focus(editor, "4")
    assert _chart_pixels(editor, "4", LOSS_COLOUR, 40) > 50  # the loss curve is on the canvas
    editor.screenshot(path=str(shots / "trainer_live_view_running.png"), clip=clip)
    urllib.request.urlopen(urllib.request.Request(url + "/interrupt", data=b"{}", method="POST",
                                                  headers={"Content-Type": "application/json"}), timeout=10)
    st = _wait(editor, "4", lambda s: s["state"] != "running", 60, "the run to end after /interrupt")
    assert st["state"] == "cancelled" and st["step"] < 5000, st
    editor.wait_for_timeout(300)
    clip = _focus(editor, "4")
    editor.screenshot(path=str(shots / "trainer_live_view_cancelled.png"), clip=clip)
    drawn = editor.evaluate("""(id) => { const n = app.graph.getNodeById(Number(id)), texts = [];
      const ctx = app.canvas.ctx, fill = ctx.fillText;
      ctx.fillText = function (t, ...a) { texts.push(String(t)); return fill.call(this, t, ...a); };
      try { app.canvas.draw(true, true); } finally { ctx.fillText = fill; }
      return texts; }""", "4")
    assert f"cancelled at step {st['step']}/5000" in drawn, [t for t in drawn if "step" in t]
    assert not any("ETA" in t for t in drawn)
    print(f"live view screenshots: {shots / 'trainer_live_view_running.png'}, {shots / 'trainer_live_view_cancelled.png'}")
    assert editor.errors == []


def test_trainer_shows_previews_on_the_node_and_validation_in_the_live_view(editor, server, shots):  # noqa: F811
    """preview_every with the VAE: ComfyUI's progress preview puts the grid on the trainer node while it trains;
    validate_every: the validation rows arrive and are drawn next to the loss."""
    url, info, _ = server
    g = tiny_run(info, 4000, 4, "browser_preview")
    g["4"]["inputs"].update(vae=["1", 2], preview_every=15, validate_every=5, probe_prompts="a photo of a cat")
    editor.evaluate(QUEUE_API, g)
    _wait(editor, "4", lambda s: s["state"] == "running" and s["step"] >= 31, 240, "step 31 (two preview rounds)")
    preview = editor.wait_for_function("""() => { const n = app.graph.getNodeById(4);
      const im = n?.imgs?.[0]; return im && im.complete && im.naturalWidth > 0 ? [im.naturalWidth, im.naturalHeight] : null; }""",
                                       timeout=60_000).json_value()
    st = _run_state(editor, "4")
    assert st["state"] == "running", st  # shown while it trains, not after
    rows = editor.evaluate("() => window.__catLiveView.runs.get('4').validation.map((r) => [r.step, r.keep_drift, r.probe_drift])")
    assert len(rows) >= 3 and rows[0] == [0, 0, 0] and [r[0] for r in rows[:3]] == [0, 5, 10], rows
    assert all(r[1] > 0 and r[2] > 0 for r in rows[1:]), rows  # the LoRA moved the prompts without the trigger
    # the grid: rows base + rounds, columns the prompts (the first caption with and without the trigger, "a photo of dog")
    assert preview[0] > 3 * 64 and preview[1] > 2 * 64, preview
    clip = _focus(editor, "4")
    clip["height"] += 360  # the preview is drawn under the node's widgets; room for it below
    editor.wait_for_timeout(300)
    shot = shots / "trainer_preview_running.png"
    editor.screenshot(path=str(shot), clip=clip)
    print(f"preview screenshot: {shot}")
    assert _chart_pixels(editor, "4") > 20  # the validation curves
    assert _chart_pixels(editor, "4", LOSS_COLOUR, 40) > 50
    urllib.request.urlopen(urllib.request.Request(url + "/interrupt", data=b"{}", method="POST",
                                                  headers={"Content-Type": "application/json"}), timeout=10)
    _wait(editor, "4", lambda s: s["state"] != "running", 60, "the run to end after /interrupt")
    assert editor.errors == []


def test_shipped_sd15_workflow_run_from_the_page_shows_is_kps_and_the_lora_path(editor, server, shots):  # noqa: F811
    """The shipped SD1.5 graph, shrunk for the CPU as test_workflows does, queued from the page: the Preview Any nodes
    show the KPS report with IS and KPS, the trainer summary and the saved LoRA's path, read from the page."""
    from conftest import shrink_for_cpu

    url, info, base = server
    api = json.loads((WF / "api" / "cat_sd15_train_kps.api.json").read_text())
    g = shrink_for_cpu(api, "sd15", "ds", "cat_tiny_open_clip.pt")
    # loaded into the editor (the nodes that show the results), queued for this page (its client id) so the results come here
    answer = editor.evaluate("""async (g) => { await app.loadApiJson(g, "cat-sd15-shrunk");
      const r = await fetch('/prompt', {method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({prompt: g, client_id: app.api?.clientId ?? app.api?.initialClientId})});
      return await r.json(); }""", g)
    assert not answer.get("node_errors") and "prompt_id" in answer, answer
    end = time.monotonic() + 300
    while time.monotonic() < end:  # the server's record of the run: done or failed, and why
        hist = editor.evaluate("async (id) => (await fetch(`/history/${id}`)).json()", answer["prompt_id"])
        status = hist.get(answer["prompt_id"], {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            break
        time.sleep(1)
    assert status.get("status_str") == "success", status
    kps, save, trainer = (next(k for k, n in g.items() if n["class_type"] == c)
                          for c in ("CAT_KPSEvaluator", "CAT_SaveLora", "CAT_LoraTrainer"))
    shown = {g[k]["inputs"]["source"][0]: k for k, n in g.items() if n["class_type"] == "PreviewAny"}
    assert set(shown) == {kps, save, trainer}
    read = """(ids) => ids.map((id) => { const n = app.graph.getNodeById(Number(id));
      const w = n?.widgets?.find((w) => w.name === "preview"); return w?.element?.value ?? w?.value ?? ""; })"""
    end = time.monotonic() + 30
    texts = ["", "", ""]
    while time.monotonic() < end and not all(texts):
        texts = editor.evaluate(read, [shown[kps], shown[save], shown[trainer]])
        time.sleep(0.5)
    report, path, summary = texts
    assert all(texts), f"the Preview Any nodes show {texts}; page errors {editor.errors}"
    lines = {line.split()[0]: line for line in report.splitlines() if line.strip()}
    is_, kps_value = float(lines["IS"].split()[1]), float(lines["KPS"].split()[1])
    assert 0 <= is_ <= 1 and 0 <= kps_value <= 1 and "no reference images" not in report  # IS as shipped
    assert path.endswith(".safetensors") and "/loras/" in path and os.path.isfile(path), path
    assert summary.startswith("CAT LoRA: 3/3 steps") and "validation" in summary and "previews" in summary, summary
    # and on the page, as a user sees it: the text areas hold the same
    dom = editor.evaluate("() => Array.from(document.querySelectorAll('textarea')).map((t) => t.value)")
    assert report in dom and path in dom
    editor.evaluate("""(id) => { const n = app.graph.getNodeById(Number(id)), c = app.canvas;
      c.ds.scale = 0.8; c.ds.offset = [60 - n.pos[0], 60 - n.pos[1]]; c.setDirty(true, true); }""", trainer)
    editor.wait_for_timeout(500)
    shot = shots / "sd15_workflow_results.png"
    editor.screenshot(path=str(shot))
    print(f"shipped workflow results: IS {is_} KPS {kps_value} LoRA {path}; screenshot {shot}")
    assert editor.errors == []
