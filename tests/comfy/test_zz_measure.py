from test_browser import browser, editor  # noqa
from test_server import server  # noqa


def test_measure(editor):
    r = editor.evaluate("""() => { const out = {};
      for (const t of ["PreviewAny", "CAT_LoraTrainer", "CAT_KPSEvaluator", "CAT_Dataset", "SaveImage", "CLIPVisionLoader"]) {
        const n = LiteGraph.createNode(t); app.graph.add(n); out[t] = n.computeSize(); }
      return out; }""")
    print("SIZES", r)
