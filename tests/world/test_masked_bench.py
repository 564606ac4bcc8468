"""`bench masked`: the task's masks are the renderer's subject, the background score reads the ring, end to end tiny."""
import json

import numpy as np
import pytest
import torch

from cat_train.world import generator as wg
from cat_train.world import masked_bench as mb


def test_task_masks_cover_the_subject_and_the_clutter_is_new():
    imgs, masks = mb.task()
    assert imgs.shape == (5, 32, 32, 3) and masks.shape == (5, 32, 32)
    for img, m, s in zip(imgs, masks, wg.identity_scenes()):
        assert np.array_equal(m.astype(bool), wg.mask(s.shape, s.cx, s.cy, s.r))
        assert (img[m.astype(bool)] == wg.draw(s)[m.astype(bool)]).all()  # the subject as the world draws it
        bg = img[~m.astype(bool)]
        assert len(np.unique(bg, axis=0)) == 2  # a two-colour checkerboard ...
        assert not any((bg == np.array(c)).all(-1).all() for c in wg.BACKGROUNDS.values())  # ... no world background


def test_ring_error_reads_the_border():
    grey = torch.full((1, 3, 32, 32), 128 / 127.5 - 1)
    err = mb.ring_error(grey, list(wg.BACKGROUNDS.values()))
    assert err.shape == (1, 3) and err[0, 0] == pytest.approx(0, abs=1e-6) and err[0, 1] > 0.4
    grey[:, :, 8:24, 8:24] = 1.0  # a subject inside the ring changes nothing
    assert mb.ring_error(grey, [wg.BACKGROUNDS["grey"]])[0, 0] == pytest.approx(0, abs=1e-6)


def test_methods_parse_and_configure():
    assert mb.parse("cat1+mask+keep") == (1.0, True, True) and mb.parse("lora") == (0.0, False, False)
    c = mb.MaskedBenchConfig(mask_floor=0.2, mask_keep=3.0)
    lc = mb.loss_config("lora+keep", c)
    assert (lc.alpha, lc.mask_floor, lc.mask_keep) == (0.0, 1.0, 3.0)
    assert not mb.loss_config("cat1", c).mask.active
    for bad in ("cat1+nope", "prior", "lora+mask+mask"):
        with pytest.raises(ValueError, match="unknown method"):
            mb.parse(bad)


def test_bench_masked_tiny_end_to_end(tmp_path, capsys):
    from cat_train.world import benches

    rc = benches.main(["masked", "--quick", "--out", str(tmp_path), "--steps", "2", "--per-prompt", "1",
            "--sample-steps", "2",
                     "--methods", "lora", "cat1+mask+keep"])
    assert rc == 0
    res = json.loads((tmp_path / "masked.json").read_text())
    assert list(res["methods"]) == ["base", "lora", "cat1+mask+keep"]
    assert res["methods"]["base"]["drift"]["mean"] == 0
    rows = [r for r in (tmp_path / "masked_table.md").read_text().splitlines()
            if r.startswith("| ") and "method" not in r]
    assert [r.split(" | ")[0][2:] for r in rows] == ["base (no adapter)", "LoRA (α=0)",
                                                     "CAT (α=1), mask floor 0.1, background keep 1"]
    assert (tmp_path / "masked_grid.png").is_file()
