"""`bench kps` end to end on a tiny setting: every method trains, samples and is scored; table, JSON and grid."""
import json

import numpy as np
import torch
from PIL import Image

from cat_train.world import bench as bench_kps


def test_bench_kps_tiny_end_to_end(tmp_path, capsys):
    rc = bench_kps.main(["kps", "--quick", "--out", str(tmp_path), "--steps", "4", "--per-prompt", "1",
                         "--sample-steps", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NOT Stable Diffusion" in out
    table = (tmp_path / "kps_table.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["base (no adapter)", "LoRA (α=0)", "CAT (α=0.5)", "CAT (α=1)",
                                                     "CAT (α=2)",
                                                     "DreamBooth prior (α=0)"]
    assert all(len(r.strip("|").split("|")) == 1 + len(bench_kps.COLUMNS) for r in rows)
    res = json.loads((tmp_path / "kps.json").read_text())
    assert res["config"]["steps"] == 4 and res["config"]["seeds"] == [0]
    assert list(res["methods"]) == ["base", *res["config"]["methods"]]
    for (m, scores), row in zip(res["methods"].items(), rows):  # the table prints the JSON's numbers, column by column
        assert set(bench_kps.COLUMNS) <= set(scores)
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert cells == [f"{scores[k]['mean']:.3f}" for k in bench_kps.COLUMNS], (m, cells)
    # the base row compares the base with itself (no drift) and never saw the striped identity
    base = res["methods"]["base"]
    assert base["drift"]["mean"] == 0 and base["drift_other"]["mean"] == 0
    assert base["identity"]["mean"] == 0 and base["leak"]["mean"] == 0
    for m in res["config"]["methods"]:  # 4 steps at lr 1e-3 move every adapted model a little and teach no identity
        s = res["methods"][m]
        assert 0 < s["drift"]["mean"] < 0.1 and 0 < s["drift_other"]["mean"] < 0.1, (m, s["drift"], s["drift_other"])
        assert s["identity"]["mean"] == 0 and s["leak"]["mean"] == 0, m
    grid = Image.open(tmp_path / "kps_grid.png")
    assert grid.size[1] == 20 + 6 * (96 + 4)  # six rows of 3x-upscaled 32 px images
    assert np.asarray(grid).std() > 10


def test_cat_methods_name_their_preservation_prompt():
    class Text:  # stands in for the world's encoder: the "context" is the prompt's length, so y is readable
        def encode_text(self, ps):
            return {"context": torch.tensor([[[float(len(p))]] for p in ps])}

    assert bench_kps.label("cat1") == "CAT (α=1)" and bench_kps.label("cat0.5:empty") == "CAT (α=0.5, y=empty)"
    for method, y in (("cat1", "a circle on a grey background"), ("cat2:empty", "")):
        ex, lc, bs = bench_kps.examples_for(method, Text(), bench_kps.BenchConfig(), seed=0)
        grey = [e for e in ex if e.cond_token["context"].item() == len("a sks circle on a grey background")]
        assert lc.alpha == float(method[3:].split(":")[0]) and bs == 1 and len(grey) >= 1
        assert all(e.cond_pres["context"].item() == len(y) for e in grey)
    ex, _, _ = bench_kps.examples_for("cat1:all", Text(), bench_kps.BenchConfig(), seed=0)
    assert len(ex) == 5 * len(bench_kps.wg.SHAPES)  # every identity image once per class
    grey = [e.cond_pres["context"].item() for e in ex if e.cond_token["context"].item() == len(
            "a sks circle on a grey background")]
    assert sorted(set(grey)) == sorted({float(len(f"a {s} on a grey background")) for s in bench_kps.wg.SHAPES})


def test_reachable_task_scores_its_identity_by_colour_and_place():
    """The reachable identity (a small yellow circle in the corner): its own training images score 1, the same circle
    elsewhere or in another colour 0; world-CLIP reads its colour; the CLI takes --task."""
    import pytest

    from cat_train.world import generator as wg
    from cat_train.world.clip import load_clip

    imgs = bench_kps.task_images("reachable")
    colours = load_clip().attributes(imgs)[1]
    assert colours == ["yellow"] * 5 and bench_kps.is_identity("reachable", imgs, colours) == [True] * 5
    moved = [wg.Scene("circle", "yellow", "grey", 20.0, 20.0, 7.0),
             wg.Scene("circle", "yellow", "grey", 11.5, 9.0, 7.0)]
    arr = torch.from_numpy(wg.to_tensor_array(np.stack([wg.draw(s) for s in moved])))
    assert bench_kps.is_identity("reachable", arr, ["yellow", "yellow"]) == [False, True]  # 2.5 px off still counts
    assert bench_kps.is_identity("reachable", imgs[:1], ["red"]) == [False]
    assert bench_kps.identity_items("reachable")[0][1] == "a sks circle on a grey background"  # same captions as novel
    with pytest.raises(SystemExit):
        bench_kps.main(["kps", "--task", "familiar"])


def test_cheaper_preservation_methods_set_keep_every_and_fraction():
    class Text:
        def encode_text(self, ps):
            return {"context": torch.tensor([[[float(len(p))]] for p in ps])}

    _, lc, _ = bench_kps.examples_for("cat1:empty/k4/p0.5", Text(), bench_kps.BenchConfig(), seed=0)
    assert (lc.alpha, lc.preservation, lc.keep_every, lc.keep_fraction) == (1.0, "empty", 4, 0.5)
    assert bench_kps.label("cat1/k4") == "CAT (α=1), term every 4 steps"
    assert bench_kps.method_name("cat0.5+apt/p0.25") == "cat0.5+apt/p0.25"
    for bad in ("cat0/k2", "lora/k2", "cat1/k0", "cat1/p1.5", "cat1/q2"):
        try:
            bench_kps.method_name(bad)
        except Exception as e:
            assert "cheaper preservation" in str(e), bad
        else:
            raise AssertionError(f"{bad} was accepted")
