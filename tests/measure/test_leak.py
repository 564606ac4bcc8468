"""Leak scan math without ComfyUI: drift per probe, ranking, the worst-probes list, the chart and the grid."""
import numpy as np
import pytest
import torch

from cat_train.measure import leak

PROMPTS = ["a photo of a dog", "a photo of a cat", "a photo of a wolf", "a red car"]
SIMS = [[1.0, 1.0], [0.5, 0.7], [0.9, 0.1], [0.8, 0.8]]  # means 1.0, 0.6, 0.5, 0.8 -> drifts 0, 0.4, 0.5, 0.2


def test_parse_probes_drops_blanks_and_repeats():
    assert leak.parse_probes("  a dog \n\n a cat\na dog\n") == ["a dog", "a cat"]
    assert len(leak.parse_probes(leak.DEFAULT_PROBES)) == 10
    with pytest.raises(ValueError, match="probes is empty"):
        leak.parse_probes(" \n \n")


def test_rank_worst_first_with_drift_and_min_pair():
    ranked = leak.rank_probes(PROMPTS, SIMS)
    assert [r.prompt for r in ranked] == ["a photo of a wolf", "a photo of a cat", "a red car", "a photo of a dog"]
    assert [round(r.drift, 12) for r in ranked] == [0.5, 0.4, 0.2, 0.0]
    assert ranked[0].min_similarity == pytest.approx(0.1) and ranked[0].n == 2 and ranked[0].index == 2
    ties = leak.rank_probes(["b", "a", "c"], [[0.5], [0.5], [0.9]])
    assert [r.prompt for r in ties] == ["b", "a", "c"]  # equal drift keeps the probe list's order
    with pytest.raises(ValueError, match="one row of pair similarities per probe"):
        leak.rank_probes(PROMPTS, SIMS[:3])
    with pytest.raises(ValueError, match="NaN"):
        leak.rank_probes(["a"], [[float("nan")]])


def test_worst_probes_top_k_and_only_drifting():
    ranked = leak.rank_probes(PROMPTS, SIMS)
    assert leak.worst_probes(ranked, 2) == ["a photo of a wolf", "a photo of a cat"]
    assert leak.worst_probes(ranked, 10) == ["a photo of a wolf", "a photo of a cat", "a red car"]  # dog: drift 0
    assert leak.worst_probes(ranked, 10, min_drift=0.3) == ["a photo of a wolf", "a photo of a cat"]
    assert leak.worst_probes(leak.rank_probes(["x", "y"], [[1.0], [1.0]]), 3) == []
    with pytest.raises(ValueError, match="top_k"):
        leak.worst_probes(ranked, 0)


def test_pair_similarities_probe_major_and_exact_one_for_identical():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 16, generator=g)  # 3 probes x 2 pairs
    adapted = base.clone()
    adapted[3] = -base[3]  # probe 1, pair 1: opposite embedding
    sims = leak.pair_similarities(base, adapted, 3)
    assert sims.shape == (3, 2) and sims.dtype == torch.float64
    assert sims[0].tolist() == [1.0, 1.0] and sims[2].tolist() == [1.0, 1.0]  # exactly: untouched probes drift 0
    assert sims[1, 0].item() == 1.0 and sims[1, 1].item() == pytest.approx(-1.0, abs=1e-12)
    ranked = leak.rank_probes(["p0", "p1", "p2"], sims)
    assert ranked[0].prompt == "p1" and ranked[0].drift == pytest.approx(1.0) and ranked[1].drift == 0.0
    with pytest.raises(ValueError, match="3 probes"):
        leak.pair_similarities(base[:5], adapted[:5], 3)


def test_report_lists_ranked_probes_and_says_when_nothing_drifted():
    ranked = leak.rank_probes(PROMPTS, SIMS)
    text = leak.report(ranked, leak.worst_probes(ranked, 2))
    rows = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert [r.split(None, 3)[1] for r in rows] == ["0.5000", "0.4000", "0.2000", "0.0000"]
    assert rows[0].endswith("a photo of a wolf") and "preservation prompts" in text
    same = leak.rank_probes(["x"], [[1.0, 1.0]])
    assert "No probe drifted" in leak.report(same, [])


def _bar_lengths(img, color):
    """Length in pixels of the bar of each chart row that has `color`."""
    a = np.asarray(img).astype(int)
    hit = (np.abs(a - np.array(color)).sum(-1) < 30)
    rows = np.where(hit.any(1))[0]
    return {int(y): int(hit[y].sum()) for y in rows}


def test_chart_bars_are_proportional_to_drift_and_worst_in_red():
    ranked = leak.rank_probes(PROMPTS, SIMS)
    img = leak.chart(ranked, leak.worst_probes(ranked, 2))
    assert img.size == (760, 44 + 24 * 4 + 10)
    red = _bar_lengths(img, (214, 60, 60))
    blue = _bar_lengths(img, (110, 140, 200))
    # bar heights cover rows 0 and 1 (the two worst) in red, row 2 in blue, the drift-0 row has no bar
    y0 = 44
    assert {(y - y0) // 24 for y in red} == {0, 1} and {(y - y0) // 24 for y in blue} == {2}
    longest, second = (max(v for y, v in red.items() if (y - y0) // 24 == i) for i in (0, 1))
    third = max(blue.values())
    assert second / longest == pytest.approx(0.4 / 0.5, abs=0.02)
    assert third / longest == pytest.approx(0.2 / 0.5, abs=0.02)
    text = np.asarray(img)[: y0, :, :].min(-1) < 100  # the title is drawn in dark text
    assert text.sum() > 200


def test_grid_places_base_left_adapted_right_in_ranked_order():
    n, h, w = 2, 16, 24
    base = [torch.full((n, h, w, 3), v / 255) for v in (20, 70, 120, 170)]  # exact 8-bit levels
    adapted = [b + 50 / 255 for b in base]
    ranked = leak.rank_probes(PROMPTS, SIMS)  # order: probe 2, 1, 3, 0
    g = torch.from_numpy(np.asarray(leak.grid(ranked, base, adapted, gap=8), dtype=np.float32) / 255)[None]
    assert g.shape == (1, 22 + 4 * (22 + h), 2 * n * w + 8, 3)
    for row, idx in enumerate([2, 1, 3, 0]):
        y = 22 + row * (22 + h) + 22
        left, right = g[0, y:y + h, : n * w], g[0, y:y + h, n * w + 8:]
        assert torch.allclose(left, base[idx][0, 0, 0, 0], atol=1e-6) and left.shape[:2] == (h, n * w)
        assert torch.allclose(right, adapted[idx][0, 0, 0, 0], atol=1e-6) and right.shape[:2] == (h, n * w)
    with pytest.raises(ValueError, match="expected"):
        leak.grid(ranked, base, [a[:, :8] for a in adapted])


def test_drifts_that_read_0_0000_are_not_recommended():
    """Issue 32: a GPU's nondeterministic sampling leaves drifts of 1e-7 on an untouched MODEL; the report showed
    every drift as 0.0000 and still listed the probes as "most drifting"."""
    ranked = leak.rank_probes(["a photo of a dog", "a photo of a cat"], [[1 - 3e-8, 1 - 1e-7], [1 - 2e-8, 1.0]])
    assert leak.worst_probes(ranked, 5) == []
    text = leak.report(ranked, [])
    assert " 0.0000 " in text and "most drifting" not in text
    assert text.endswith("No probe drifted by 0.0001 or more (the adapted MODEL draws what the base draws, up to "
                         "rounding): nothing to add to the preservation prompts."), text
    assert leak.worst_probes(leak.rank_probes(["a", "b"], [[0.9998], [1.0]]), 5) == ["a"]  # 0.0002: shown, listed
