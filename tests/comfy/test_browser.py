"""The graph editor in a real browser: ComfyUI's own frontend, served by a real server with this pack,
driven in headless Chromium (1920x1080, as users see it) through Playwright's Python package (pointed at the
system Chromium; no browser download).

Each template the server lists for this pack (the shipped UI workflows) is fetched and opened the way the template
browser opens it: it opens at its saved, readable zoom with its Note in view, no missing node types, errors only on the
model files the test server lacks, no node grown by the editor or covering another, and app.graphToPrompt() equals the
shipped .api.json input for input. Then tiny training runs are queued from the page: the live chart is drawn, the
node's progress bar moves, a finished run reads "done", after POST /interrupt the node shows the run as cancelled, the
preview grid sits under the chart, and a run on each shipped graph's trainer grows it over no other node. Every check
on what is drawn runs in each node renderer the frontend offers: the LiteGraph canvas, and Vue nodes ("Nodes 2.0",
frontend 1.3x and later) where the frontend has it as a setting. Screenshots land in pytest's temp dir (paths are
printed; run with -s to see them).

Needs COMFYUI_PATH (see conftest.py), the `playwright` Python package, ComfyUI's frontend package and a
Chromium (CHROMIUM_PATH, or chromium / chromium-browser / google-chrome on PATH).
"""
from __future__ import annotations

import json
import os
import random
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

READY = "!!(window.app?.graph && window.LiteGraph?.registered_node_types?.CAT_LoraTrainer && window.__catLiveView)"
SCREEN = {"width": 1920, "height": 1080}


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
    """The editor page, loaded and with this pack's nodes and live view registered; records page errors. The editor's
    own defaults otherwise (its text size for drawing nodes as blank boxes included), as a user has them."""
    url = server[0]
    # a fresh user gets a template picker over the canvas, and a minimap in a corner: neither belongs in the shots
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
    urllib.request.urlopen(urllib.request.Request(url + "/settings", data=json.dumps(settings).encode(), method="POST",
                                                  headers={"Content-Type": "application/json"}), timeout=10)
    page = browser.new_page(viewport=SCREEN)
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


def renderers(page) -> list[str]:
    """The node renderers this frontend offers its users: the LiteGraph canvas, and Vue nodes ("Nodes 2.0") where it is
    a user setting (frontend 1.27 has it only as a hidden experiment)."""
    vue = page.evaluate("""() => { const id = "Comfy.VueNodes.Enabled";
      const s = app.extensionManager?.setting?.settings?.[id] ?? app.ui?.settings?.settingsLookup?.[id];
      return !!s && s.type !== "hidden"; }""")
    return ["litegraph", "vue"] if vue else ["litegraph"]


def use_renderer(page, renderer: str) -> None:
    on = renderer == "vue"
    if page.evaluate("() => !!LiteGraph.vueNodesMode") == on:
        return
    page.evaluate("async (on) => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }", on)
    page.wait_for_function("(on) => !!LiteGraph.vueNodesMode === on && (!on || !!document.querySelector('[data-node-id]'))",
                           arg=on, timeout=30_000)
    page.wait_for_timeout(1000)


# As the template browser opens a template: frontend 1.27 calls loadGraphData(json, true, true, name) (the saved view is
# restored), 1.49 adds {openSource: "template"} (the graph is fitted to the screen); each ignores what it does not know.
OPEN_TEMPLATE = """async (name) => {
  const ui = await (await fetch(`/api/workflow_templates/ComfyUI-CAT/${name}.json`)).json();
  await app.loadGraphData(ui, true, true, name, {openSource: "template", showMissingNodesDialog: false,
                                                  showMissingModelsDialog: false});
  return ui;
}"""

STATE = """async (settle) => {
  await new Promise((r) => setTimeout(r, settle));
  const c = app.canvas;
  const nodes = app.graph.nodes.map((n) => ({id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
    errors: !!n.has_errors, size: Array.from(n.size), box: Array.from(n.boundingRect),
    outputs: (n.outputs ?? []).map((o) => o.type)}));
  const prompt = await app.graphToPrompt();
  // the view it opened at, judged with the editor's default text threshold (8 px)
  const lod = c.min_font_size_for_lod;
  c.min_font_size_for_lod = 8;
  c.ds.computeVisibleArea?.(c.viewport);
  const view = {scale: c.ds.scale, offset: Array.from(c.ds.offset), low_quality: c.low_quality};
  c.min_font_size_for_lod = lod;
  // where the Note is on screen, and what the page shows there (the canvas, or the Note's own text box)
  const note = app.graph.nodes.find((n) => n.type === "Note"), r = c.canvas.getBoundingClientRect();
  const [x0, y0] = c.ds.convertOffsetToCanvas([note.pos[0], note.pos[1] - 30]);
  const [x1, y1] = c.ds.convertOffsetToCanvas([note.pos[0] + note.size[0], note.pos[1] + note.size[1]]);
  const rect = [r.left + x0, r.top + y0, r.left + x1, r.top + y1];
  const own = (e) => !!e && (e === c.canvas || !!e.closest?.('[data-node-id="' + note.id + '"]')
    || note.widgets?.some((w) => w.element && (w.element === e || w.element.contains(e))));
  const probes = [];
  for (const fx of [0.03, 0.5, 0.97]) for (const fy of [0.03, 0.5, 0.97])
    probes.push([rect[0] + fx * (rect[2] - rect[0]), rect[1] + fy * (rect[3] - rect[1])]);
  const hidden = probes.filter(([x, y]) => !own(document.elementFromPoint(x, y))).map(([x, y]) => [Math.round(x), Math.round(y),
    document.elementFromPoint(x, y)?.tagName ?? "off screen"]);
  // Vue nodes: the boxes the page draws
  const dom = Array.from(document.querySelectorAll('[data-node-id]')).map((e) => ({id: e.dataset.nodeId,
    box: (({left, top, width, height}) => [left, top, width, height])(e.getBoundingClientRect())}));
  return {nodes, output: prompt.output, view, note: {rect, hidden}, dom};
}"""


# The frontend's Preview Any adds a read-only text widget (1.27: "preview", which graphToPrompt sends along; 1.49:
# "preview_text" and "preview_mode", not sent); the node's schema has no such inputs and the server ignores them.
EDITOR_ONLY = {"PreviewAny": ("preview", "preview_text", "preview_mode")}
PREVIEW_TEXT = ("preview", "preview_text")


def _overlapping(nodes: list[dict]) -> list[tuple]:
    """Pairs of nodes whose drawn boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            ax, ay, aw, ah = a["box"]
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["id"], a.get("type"), b["id"], b.get("type")))
    return out


def _choices(spec: list):
    """The options of a combo input in /object_info (a list, or COMBO with "options"), else None."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] if isinstance(spec[0], list) else opts.get("options") if spec[0] == "COMBO" else None


def _lacking_files(info: dict, api: dict) -> set[str]:
    """API node ids with a combo value the server does not offer: the model files the test server lacks."""
    out = set()
    for nid, node in api.items():
        spec = {**info[node["class_type"]]["input"].get("required", {}), **info[node["class_type"]]["input"].get("optional", {})}
        for k, v in node["inputs"].items():
            choices = _choices(spec[k]) if k in spec else None
            if choices is not None and not isinstance(v, list) and v not in choices:
                out.add(nid)
    return out


def _check_opened(page, path, ui: dict, api: dict, info: dict, renderer: str) -> dict:
    r = page.evaluate(STATE, 2000 if renderer == "vue" else 300)
    where = f"{path.name} ({renderer})"
    nodes = r["nodes"]
    assert len(nodes) == len(ui["nodes"])
    unknown = [(n["id"], n["type"]) for n in nodes if not n["registered"]]
    assert unknown == [], f"{where}: node types the editor does not know: {unknown}"
    # newer editors mark a node whose model file the server lacks as an error: only those may be marked
    lacking = _lacking_files(info, api)
    marked = [(n["id"], n["type"]) for n in nodes if n["errors"] and str(n["id"]) not in lacking]
    assert marked == [], f"{where}: nodes marked as errors with every file present: {marked}"
    shipped = {str(n["id"]): n for n in ui["nodes"]}  # ids are numbers in 1.27, strings in 1.49
    grown = [(n["id"], n["type"], shipped[str(n["id"])]["size"], n["size"]) for n in nodes
             if n["size"] != shipped[str(n["id"])]["size"]]
    assert grown == [], f"{where}: the editor resized nodes on load (shipped sizes are too small): {grown}"
    # outputs as the server defines them now: the shipped ones first, any the node gained since added by the editor
    for n in nodes:
        if n["type"] in info:
            have = [o["type"] for o in shipped[str(n["id"])]["outputs"]]
            assert n["outputs"] == list(info[n["type"]]["output"]) and n["outputs"][:len(have)] == have, (where, n)
    assert _overlapping(nodes) == []
    if renderer == "vue":
        assert len(r["dom"]) == len(nodes) and _overlapping(r["dom"]) == [], f"{where}: {_overlapping(r['dom'])}"
    assert r["view"]["scale"] == ui["extra"]["ds"]["scale"] and not r["view"]["low_quality"], \
        f"{where} opens at zoom {r['view']['scale']}, where the editor draws blank boxes"
    assert r["note"]["hidden"] == [], f"{where}: the Note at {r['note']['rect']} is not all in view: {r['note']['hidden']}"
    return r


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_shipped_workflow_opens_from_the_template_browser_as_its_api_graph(editor, server, shots, path):  # noqa: F811
    """Listed by /workflow_templates, fetched and opened as the template browser does, in each renderer."""
    info = server[1]
    listed = editor.evaluate("async () => (await fetch('/workflow_templates')).json()")
    assert path.stem in listed["ComfyUI-CAT"], f"{path.name} is not offered in the template browser: {listed}"
    api = json.loads((WF / "api" / path.name.replace(".json", ".api.json")).read_text())
    for renderer in renderers(editor):
        use_renderer(editor, renderer)
        ui = editor.evaluate(OPEN_TEMPLATE, path.stem)
        assert ui == json.loads(path.read_text())
        r = _check_opened(editor, path, ui, api, info, renderer)
        editor.screenshot(path=str(shots / f"{path.stem}_{renderer}_opened.png"))
        if renderer != "litegraph":
            continue
        out = r["output"]
        assert set(out) == set(api), f"prompt nodes {sorted(out)} != API graph nodes {sorted(api)}"
        for nid, node in api.items():
            assert out[nid]["class_type"] == node["class_type"]
            spec = info[node["class_type"]]["input"]
            editor_only = set(EDITOR_ONLY.get(node["class_type"], ())) - set(spec.get("required", {})) - set(spec.get("optional", {}))
            sent = {k: v for k, v in out[nid]["inputs"].items() if k not in editor_only}
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
                                ("CLIPLoader", "clip_name", "value_not_in_list"),
                                ("CAT_KPSEvaluator", "clip_checkpoint", "value_not_in_list"),
                                ("CAT_LeakScan", "clip_checkpoint", "value_not_in_list")}, answer
        assert refused, "the test server has none of the shipped model files, so validation must name them"
        overview(editor, shots / f"{path.stem}.png")
    use_renderer(editor, "litegraph")
    print(f"{path.name}: opened in {renderers(editor)}, screenshots {shots}/{path.stem}_*.png")
    assert editor.errors == []


def overview(page, shot) -> None:
    """A screenshot of the whole graph (workflows/_thumbnails.py makes the template browser's thumbnails of it), fitted
    into the part of the screen no bar or notice covers in either frontend, text drawn at any zoom."""
    clip = page.evaluate("""() => { const c = app.canvas, b = app.graph.nodes.map((n) => n.boundingRect);
      const r = c.canvas.getBoundingClientRect(), area = [100, 130, 1380, 920];  // x, y, width, height on screen
      const x0 = Math.min(...b.map((q) => q[0])) - 20, y0 = Math.min(...b.map((q) => q[1])) - 60;
      const x1 = Math.max(...b.map((q) => q[0] + q[2])) + 20, y1 = Math.max(...b.map((q) => q[1] + q[3])) + 20;
      const s = Math.min(area[2] / (x1 - x0), area[3] / (y1 - y0));
      c.ds.scale = s; c.ds.offset = [(area[0] - r.left) / s - x0, (area[1] - r.top) / s - y0];
      window.__catLod = c.min_font_size_for_lod; c.min_font_size_for_lod = 0;
      // the outline newer editors draw on nodes whose model file is missing: the test server has none of them
      window.__catErrors = app.graph.nodes.filter((n) => n.has_errors); window.__catErrors.forEach((n) => { n.has_errors = false; });
      c.setDirty(true, true);
      return {x: area[0], y: area[1], width: (x1 - x0) * s, height: (y1 - y0) * s}; }""")
    page.wait_for_timeout(500)
    page.screenshot(path=str(shot), clip=clip)
    page.evaluate("""() => { app.canvas.min_font_size_for_lod = window.__catLod;
      window.__catErrors.forEach((n) => { n.has_errors = true; }); app.canvas.setDirty(true, true); }""")


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


def chart(page, node_id: str, colours: list[list[int]] | None = None, tol: int = 25) -> dict:
    """Where the trainer's chart was drawn (the main canvas, or in Vue nodes the widget's own canvas) and what is there:
    pixels within `tol` of one of `colours` in every channel (None: the live view's validation colours), near-white
    pixels (the preview grid's background: the chart has none), and probe points on screen where the page shows
    something else than that canvas (a node or text box over the chart)."""
    return page.evaluate("""async ({id, colours, tol}) => {
      const n = app.graph.getNodeById(Number(id)), view = window.__catLiveView;
      if (!view.drawn) return null;  // an extension that does not say where it drew
      view.drawn.delete(String(id));
      if (LiteGraph.vueNodesMode) n.widgets.find((w) => w.name === view.CHART)?.triggerDraw?.();
      else app.canvas.draw(true, true);
      await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 50)));
      const d = view.drawn.get(String(id));
      if (!d) return null;
      const [x0, y0, x1, y1] = d.rect.map(Math.round), cv = d.canvas;
      const px = cv.getContext("2d").getImageData(x0, y0, x1 - x0, y1 - y0).data;
      const cols = colours ?? view.VALIDATION.map((s) => s.color.match(/\\d+/g).map(Number));
      let hits = 0, white = 0;
      for (let i = 0; i < px.length; i += 4) {
        if (cols.some(([r, g, b]) => Math.abs(px[i] - r) < tol && Math.abs(px[i + 1] - g) < tol && Math.abs(px[i + 2] - b) < tol)) hits++;
        if (px[i] > 240 && px[i + 1] > 240 && px[i + 2] > 240) white++;
      }
      const r = cv.getBoundingClientRect(), sx = r.width / cv.width, sy = r.height / cv.height;
      const covered = [];
      for (let i = 1; i < 10; i++) for (let j = 1; j < 5; j++) {
        const x = r.left + (x0 + (x1 - x0) * i / 10) * sx, y = r.top + (y0 + (y1 - y0) * j / 5) * sy;
        const e = document.elementFromPoint(x, y);
        if (e !== cv) covered.push([Math.round(x), Math.round(y), e ? e.tagName + "." + String(e.className).slice(0, 40) : "off screen"]);
      }
      return {hits, white, pixels: px.length / 4, covered, main: cv === app.canvas.canvas,
              screen: [r.left + x0 * sx, r.top + y0 * sy, r.left + x1 * sx, r.top + y1 * sy]};
    }""", {"id": node_id, "colours": colours, "tol": tol})


LOSS_COLOUR = [[110, 160, 240]]  # the loss curve, rgb(110,160,255); with tol 40: blue above 200, as anti-aliasing leaves it


def _focus(page, node_id: str, scale: float = 1) -> dict:
    """The node near the canvas' top left at `scale`; returns its screen clip (title bar included)."""
    clip = page.evaluate("""({id, scale}) => {
      const n = app.graph.getNodeById(Number(id)), c = app.canvas, r = c.canvas.getBoundingClientRect();
      // clear of the side and top bars, which newer frontends lay over the canvas
      const left = Math.max(r.left, 80), top = Math.max(r.top, 100);
      c.ds.scale = scale; c.ds.offset = [(left - r.left + 10) / scale - n.pos[0], (top - r.top + 40) / scale - n.pos[1]];
      c.setDirty(true, true); c.draw(true, true);
      return {x: left, y: top, width: (n.size[0] + 20) * scale, height: (n.size[1] + 50) * scale};
    }""", {"id": node_id, "scale": scale})
    page.wait_for_timeout(300)
    return clip


def _chart_in_view(page, node_id: str, shot=None, clip=None, **kw) -> dict:
    """The chart drawn, loss curve on it, nothing over it; optionally a screenshot."""
    c = chart(page, node_id, LOSS_COLOUR, 40, **kw)
    assert c is not None, "the trainer's chart was not drawn"
    assert c["hits"] > 50, c  # the loss curve is on it
    assert c["covered"] == [], f"something covers the chart: {c['covered']}"
    assert c["white"] < 0.002 * c["pixels"], f"the preview grid (white) is drawn over the chart: {c['white']} px"
    if shot is not None:
        page.screenshot(path=str(shot), clip=clip)
    return c


def stop_runs(url: str) -> None:
    """Clears the queue and interrupts the running prompt: a failed test leaves no long run in the way of the next."""
    for path, body in (("/queue", b'{"clear": true}'), ("/interrupt", b"{}")):
        urllib.request.urlopen(urllib.request.Request(url + path, data=body, method="POST",
                                                      headers={"Content-Type": "application/json"}), timeout=10)


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
        choices = _choices(s)
        opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
        if k not in inputs or (choices is not None and inputs[k] not in choices):
            inputs[k] = opts.get("default", choices[0] if choices else None)
    return g


def _look_at_the_running_chart(editor, shots) -> None:
    first = _wait(editor, "4", lambda s: s["state"] == "running" and s["total"] == 5000 and s["step"] >= 3
                  and s["progress"] is not None, 180, "the long run's third step")
    # 40 steps give the screenshot a curve worth looking at (the README shows it)
    later = _wait(editor, "4", lambda s: s["step"] >= max(first["step"] + 5, 40) and s["progress"] is not None, 180,
                  "step 40")
    assert 0 < first["progress"] < later["progress"] < 1, (first, later)  # ComfyUI's own progress bar on the node
    for renderer in renderers(editor):
        use_renderer(editor, renderer)
        clip = _focus(editor, "4")
        before = _run_state(editor, "4")["step"]
        c = _chart_in_view(editor, "4", shots / f"trainer_live_view_running_{renderer}.png", clip)
        assert c["main"] == (renderer == "litegraph"), c  # Nodes 2.0 draws it on the widget's own canvas
        time.sleep(1.5)
        assert _run_state(editor, "4")["step"] > before and chart(editor, "4", LOSS_COLOUR, 40)["hits"] > 50  # still live


def test_training_from_the_page_draws_live_view_and_shows_cancel(editor, server, shots):  # noqa: F811
    url, info, _ = server
    # A short run to its end: every step drawn, the node reads "done".
    editor.evaluate(QUEUE_API, tiny_run(info, 12, 1, "browser_done"))
    st = _wait(editor, "4", lambda s: s["state"] != "running" and s["step"] == s["total"], 180, "the 12-step run to finish")
    assert st["state"] == "done" and st["points"] == 12, st
    assert st["height"] >= 454 + 150  # the node grew to hold the chart under its widgets

    # A long run, cancelled from the API: the chart is drawn, the progress bar moves, then "cancelled".
    editor.evaluate(QUEUE_API, tiny_run(info, 5000, 2, "browser_cancel"))
    try:
        _look_at_the_running_chart(editor, shots)
    finally:
        use_renderer(editor, "litegraph")
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
    # the line also says where to resume from (issue 32): "cancelled at step N/5000 · resume_from <folder>/cat-step..."
    assert any(t.startswith(f"cancelled at step {st['step']}/5000 · resume_from ") for t in drawn), \
        [t for t in drawn if "step" in t]
    assert not any("ETA" in t for t in drawn)
    print(f"live view screenshots: {shots}/trainer_live_view_*.png")
    assert editor.errors == []


def test_trainer_shows_previews_under_the_chart_and_validation_in_it(editor, server, shots):  # noqa: F811
    """preview_every with the VAE: ComfyUI's progress preview puts the grid on the trainer node while it trains, under
    the chart, not over it (newer frontends size the preview themselves); validate_every: the validation rows arrive
    and are drawn next to the loss."""
    url, info, _ = server
    g = tiny_run(info, 4000, 4, "browser_preview")
    g["4"]["inputs"].update(vae=["1", 2], preview_every=15, validate_every=5, probe_prompts="a photo of a cat")
    editor.evaluate(QUEUE_API, g)
    try:
        _look_at_the_preview(editor, shots)
    finally:
        use_renderer(editor, "litegraph")
        stop_runs(url)
    _wait(editor, "4", lambda s: s["state"] != "running", 60, "the run to end after /interrupt")
    assert editor.errors == []


def _look_at_the_preview(editor, shots) -> None:
    _wait(editor, "4", lambda s: s["state"] == "running" and s["step"] >= 31, 240, "step 31 (two preview rounds)")
    _focus(editor, "4")  # watched, as a user does: the editor loads a preview only for a node it draws
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
    for renderer in renderers(editor):
        use_renderer(editor, renderer)
        clip = _focus(editor, "4", 0.7)  # the whole node, the preview under the chart, on a 1080 px screen
        c = _chart_in_view(editor, "4")
        # the preview is on the node, under the chart: the LiteGraph canvas draws it (white grid) below the chart,
        # Nodes 2.0 shows it as an image below the chart's canvas
        below = editor.evaluate("""() => { const n = app.graph.getNodeById(4), c = app.canvas;
          if (LiteGraph.vueNodesMode) { const im = Array.from(document.querySelectorAll('[data-node-id="4"] img'))
            .map((e) => e.getBoundingClientRect()).find((b) => b.height > 20);
            return im ? [im.top, im.bottom] : null; }
          const w = n.widgets.find((x) => x.name === "$$canvas-image-preview"); if (!w) return null;
          const r = c.canvas.getBoundingClientRect(), y = c.ds.convertOffsetToCanvas([0, n.pos[1] + w.y])[1] + r.top;
          return [y, y + (w.computedHeight ?? n.size[1] - w.y) * c.ds.scale]; }""")
        assert below is not None and below[0] >= c["screen"][3] - 1, (renderer, below, c["screen"])
        assert chart(editor, "4")["hits"] > 20  # the validation curves
        editor.screenshot(path=str(shots / f"trainer_preview_running_{renderer}.png"), clip=clip)
    print(f"preview screenshots: {shots}/trainer_preview_running_*.png")


def _events_for(api: dict, trainer: str, info: dict) -> dict:
    """A tiny API graph whose trainer has the id of a shipped graph's trainer (`trainer`), of the same class: its events
    and previews land on that node of the graph open in the editor. The helpers get ids the shipped graphs do not use."""
    cls = api[trainer]["class_type"]
    seed = random.randrange(10 ** 6)  # a new prompt each time: ComfyUI would answer a repeated one from its cache
    base = train_graph(steps=5, seed=seed, checkpoint_name=f"grow_{seed}", save_name=f"grow_{seed}")
    if cls == "CAT_LoraTrainer":
        g = {"9001": base["1"], "9002": base["2"], "9003": base["3"], trainer: base["4"], "9005": base["5"]}
        g[trainer]["inputs"].update(model=["9001", 0], dataset=["9002", 0], loss_config=["9003", 0], vae=["9001", 2],
                                    preview_every=2, validate_every=2)
        g["9005"]["inputs"]["lora"] = [trainer, 1]
    else:
        spec = {**info[cls]["input"]["required"], **info[cls]["input"].get("optional", {})}
        inputs = {k: v for k, v in api[trainer]["inputs"].items() if not isinstance(v, list) and k in spec}
        inputs.update(model=["9001", 0], clip=["9001", 1], dataset=["9002", 0], steps=5, seed=seed)
        g = {"9001": base["1"], "9002": base["2"], trainer: {"class_type": cls, "inputs": inputs},
             "9005": {"class_type": "CAT_SaveCatVersion", "inputs": {"catversion": [trainer, 1], "name": f"grow_{seed}"}}}
    g["9002"]["inputs"].update(vae=["9001", 2], clip=["9001", 1])
    return g


TRAINERS = ("CAT_LoraTrainer", "CAT_CatVersionTrainer")


def _train_each(editor, api: dict, trainers: list[str], info: dict) -> None:
    for t in trainers:
        _focus(editor, t)  # watched, as a user does: the editor loads a preview only for a node it draws
        answer = editor.evaluate("""async (g) => { const r = await fetch('/prompt', {method: 'POST', headers:
          {'Content-Type': 'application/json'}, body: JSON.stringify({prompt: g,
          client_id: app.api?.clientId ?? app.api?.initialClientId})}); return await r.json(); }""", _events_for(api, t, info))
        assert "prompt_id" in answer and not answer.get("node_errors"), answer
        _wait(editor, t, lambda s: s["state"] == "done", 180, f"the tiny run on trainer {t}")
        if api[t]["class_type"] == "CAT_LoraTrainer":
            editor.wait_for_function("(id) => !!app.graph.getNodeById(id)?.imgs?.length", arg=int(t), timeout=30_000)


@pytest.mark.parametrize("path", [p for p in UI if any(n["type"] in TRAINERS for n in json.loads(p.read_text())["nodes"])],
                         ids=lambda p: p.name)
def test_shipped_trainers_grow_over_no_other_node(editor, server, shots, path):  # noqa: F811
    """A shipped graph open as the template browser opens it, each trainer in it trained (a tiny run under its node id,
    with previews for the LoRA trainer): the chart and the preview grow the node over nothing, and the whole chart is
    in view with nothing over it, in each renderer (the summary's Preview Any used to sit under it)."""
    info = server[1]
    api = json.loads((WF / "api" / path.name.replace(".json", ".api.json")).read_text())
    trainers = [k for k, n in api.items() if n["class_type"] in TRAINERS]
    editor.evaluate(OPEN_TEMPLATE, path.stem)
    try:
        _train_each(editor, api, trainers, info)
    finally:
        stop_runs(server[0])
    for renderer in renderers(editor):
        use_renderer(editor, renderer)
        r = editor.evaluate(STATE, 2000 if renderer == "vue" else 300)
        assert _overlapping(r["nodes"]) == [], f"{path.name} ({renderer}): {_overlapping(r['nodes'])}"
        if renderer == "vue":
            assert _overlapping(r["dom"]) == [], f"{path.name} ({renderer}): {_overlapping(r['dom'])}"
        sizes = {str(n["id"]): n["size"] for n in r["nodes"]}
        for t in trainers:
            clip = _focus(editor, t)
            _chart_in_view(editor, t, shots / f"{path.stem}_trainer{t}_{renderer}.png", clip)
            print(f"{path.name} ({renderer}): trainer {t} {sizes[t]}")
    use_renderer(editor, "litegraph")
    assert editor.errors == []


def test_shipped_sd15_workflow_run_from_the_page_shows_is_kps_and_the_lora_path(editor, server, shots):  # noqa: F811
    """The shipped SD1.5 graph, shrunk for the CPU as test_workflows does (saving every step, so the summary has its
    per-step lines), queued from the page: the Preview Any nodes show the KPS report with IS and KPS, the trainer
    summary and the saved LoRA's path, read from the page, each whole in its box."""
    from conftest import shrink_for_cpu

    url, info, base = server
    api = json.loads((WF / "api" / "cat_sd15_train_kps.api.json").read_text())
    g = shrink_for_cpu(api, "sd15", "ds", "cat_tiny_open_clip.pt", steps=6, save_every=1)
    # the shipped UI graph in the editor (the nodes that show the results, at their shipped sizes), the shrunk graph
    # queued under the same node ids for this page (its client id) so the results come here
    editor.evaluate(OPEN_TEMPLATE, "cat_sd15_train_kps")
    answer = editor.evaluate("""async (g) => { const r = await fetch('/prompt', {method: 'POST', headers:
      {'Content-Type': 'application/json'}, body: JSON.stringify({prompt: g, client_id: app.api?.clientId ?? app.api?.initialClientId})});
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
    read = """({ids, names}) => ids.map((id) => { const n = app.graph.getNodeById(Number(id));
      const w = n?.widgets?.find((w) => names.includes(w.name)); return w?.element?.value ?? w?.value ?? ""; })"""
    end = time.monotonic() + 30
    texts = ["", "", ""]
    while time.monotonic() < end and not all(texts):
        texts = editor.evaluate(read, {"ids": [shown[kps], shown[save], shown[trainer]], "names": list(PREVIEW_TEXT)})
        time.sleep(0.5)
    report, path, summary = texts
    assert all(texts), f"the Preview Any nodes show {texts}; page errors {editor.errors}"
    lines = {line.split()[0]: line for line in report.splitlines() if line.strip()}
    is_, kps_value = float(lines["IS"].split()[1]), float(lines["KPS"].split()[1])
    assert 0 <= is_ <= 1 and 0 <= kps_value <= 1 and "no reference images" not in report  # IS as shipped
    assert path.endswith(".safetensors") and "/loras/" in path and os.path.isfile(path), path
    assert summary.startswith("CAT LoRA: 6/6 steps") and "validation" in summary and "previews" in summary, summary
    assert "per-step table" in summary and "best step" in summary, summary
    for renderer in renderers(editor):
        use_renderer(editor, renderer)
        # on the page, as a user sees it: each text in a box that holds it whole (no scrolling to find the table)
        for nid, text in zip([shown[kps], shown[save], shown[trainer]], texts):
            _focus(editor, nid)
            box = editor.evaluate("""(text) => { const t = Array.from(document.querySelectorAll("textarea"))
              .find((e) => e.value === text && e.offsetParent !== null);
              return t ? {scroll: t.scrollHeight, client: t.clientHeight} : null; }""", text)
            assert box is not None, f"{renderer}: no text box on the page shows {text!r}"
            assert box["scroll"] <= box["client"] + 2, f"{renderer}: {box['scroll']} px of text in a {box['client']} px box: {text}"
        _focus(editor, trainer, 0.6)  # the trainer and its summary under it
        editor.wait_for_timeout(800)
        editor.screenshot(path=str(shots / f"sd15_workflow_results_{renderer}.png"))
    use_renderer(editor, "litegraph")
    print(f"shipped workflow results: IS {is_} KPS {kps_value} LoRA {path}; screenshots {shots}/sd15_workflow_results_*.png")
    assert editor.errors == []


def test_template_browser_shows_each_template_with_its_thumbnail(editor, server, shots):  # noqa: F811
    """The template browser's cards for this pack, as a user opens it: each shows its thumbnail (the frontend asks for
    `<name>.jpg` next to the template; workflows/_thumbnails.py writes them), not the placeholder."""
    from PIL import Image

    names = sorted(p.stem for p in UI)
    for name in names:
        with Image.open(WF / f"{name}.jpg") as im:  # small, square, a real picture
            assert im.format == "JPEG" and im.size == (480, 480), (name, im.format, im.size)
        assert (WF / f"{name}.jpg").stat().st_size < 60_000, name
    editor.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    try:
        editor.wait_for_timeout(2500)
        editor.evaluate("""() => { const nav = Array.from(document.querySelectorAll('button, a, li, div, span'))
          .filter((e) => e.innerText?.trim() === 'ComfyUI-CAT'); nav[nav.length - 1]?.click(); }""")
        cards = None
        end = time.monotonic() + 30
        while time.monotonic() < end and not (cards and all(c and c["loaded"] for c in cards.values())):
            time.sleep(0.5)
            # each card: the smallest box around the template's name that holds a picture, and that picture
            cards = editor.evaluate("""(names) => Object.fromEntries(names.map((name) => {
              const dialog = document.querySelector('[role="dialog"]');
              const title = Array.from(dialog?.querySelectorAll('*') ?? []).find((e) => e.children.length === 0
                && e.textContent.trim() === name && e.offsetParent !== null);
              let card = title;
              while (card && !card.querySelector('img')) card = card.parentElement;
              const shown = card ? names.filter((n) => card.textContent.includes(n)) : [];
              const im = shown.length === 1 ? card.querySelector('img') : null;
              return [name, im ? {loaded: im.complete && im.naturalWidth > 0, size: [im.naturalWidth, im.naturalHeight]} : null];
            }))""", names)
        editor.screenshot(path=str(shots / "template_browser.png"))
        print(f"template browser: {shots / 'template_browser.png'}")
        assert cards and all(c and c["loaded"] and c["size"] == [480, 480] for c in cards.values()), cards
    finally:
        editor.keyboard.press("Escape")
        editor.wait_for_timeout(300)
    assert editor.errors == []
