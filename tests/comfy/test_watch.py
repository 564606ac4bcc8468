"""The trainer node watching its run (nodes/watch.py): previews, validation, IS/KPS per saved step with a CLIP_VISION,
the best step; and the LoRA it trains is the same, bit for bit, with all of it on or off."""
from __future__ import annotations

import csv
import os

import pytest
import torch

from conftest import pack_module
from test_clip_vision import tiny_clip_vision  # noqa: F401  (fixture)


def _run(comfy, tiny_sd15, dataset_dir, tmp_path, name, watch, save_every=2):
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    L = pack_module(comfy, "cat_train.training")
    ds_mod = pack_module(comfy, "nodes.dataset")
    T = pack_module(comfy, "cat_train.training")
    sv = pack_module(comfy, "nodes.save_lora")
    mp, clip, vae = tiny_sd15
    ds = ds_mod.build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    loss = L.CatLossConfig(1.0, "class", "dog")
    spec = A.LoraSpec(rank=4, alpha=4.0)
    cfg = T.TrainConfig(steps=4, lr=1e-2, seed=3, save_every=save_every, checkpoint_dir=str(tmp_path / name))
    writer = sv.step_lora_writer(mp, str(tmp_path / "loras"), name, loss, spec, cfg, ds)
    w = dict(watch, out_dir=tmp_path / name) if watch else None
    return tr.train_on_model(mp, ds, loss, spec, cfg, "9", on_save=writer, watch=w)


def test_watch_on_or_off_trains_the_same_lora_and_reports_steps(comfy, tiny_sd15, dataset_dir, tmp_path, tiny_clip_vision):  # noqa: F811
    mp, clip, vae = tiny_sd15
    *_, off = _run(comfy, tiny_sd15, dataset_dir, tmp_path, "off", None)
    _, _, _, summary, on = _run(comfy, tiny_sd15, dataset_dir, tmp_path, "on",
                                dict(vae=vae, preview_every=1, validate_every=1, probes="a photo of a cat | a photo of a wolf",
                                     clip_vision=tiny_clip_vision))
    assert off.measured == {}
    assert off.weights.keys() == on.weights.keys()
    for k in off.weights:  # previews, validation and scoring draw nothing from the training RNG
        assert torch.equal(off.weights[k].up, on.weights[k].up) and torch.equal(off.weights[k].down, on.weights[k].down), k
    m = on.measured
    # grid: a base row and one row per step (preview_every 1; the saved steps reuse their round), columns the prompts
    grid = m["previews"]
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    run = tmp_path / "on"
    assert (run / "previews.png").is_file() and (run / "steps.png").is_file()
    rows = list(csv.DictReader((run / "validation.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4] and all(r["probe_drift"] != "" for r in rows)
    assert float(rows[0]["keep_drift"]) == 0.0 and float(rows[-1]["keep_drift"]) > 0  # LoRA B = 0 at the start
    steps = list(csv.DictReader((run / "steps.csv").open()))
    assert [int(r["step"]) for r in steps] == [2, 4]
    for r in steps:
        assert 0 <= float(r["IS"]) <= 1 and 0 <= float(r["KPS"]) <= 1 and float(r["keep_drift"]) > 0
        assert r["file"].endswith(f"on_step{int(r['step']):06d}.safetensors")
        png = r["file"].replace(".safetensors", ".png")
        assert os.path.isfile(png)  # the grid next to the step LoRA
    # the best step: the core's rule on this table, its file as the output
    best = pack_module(comfy, "cat_train.measure.best_step").pick_best_step(
        [{"step": int(r["step"]), "IS": float(r["IS"]), "keep_drift": float(r["keep_drift"])} for r in steps])
    assert m["best_file"] == steps[[int(r["step"]) for r in steps].index(best.step)]["file"]
    assert f"best step {best.step}: {m['best_file']}" in summary
    assert "s per round" in summary and "step | IS | KPS | keep drift | fit" in summary


def test_previews_need_the_vae(comfy, tiny_sd15, dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="needs the vae input"):
        _run(comfy, tiny_sd15, dataset_dir, tmp_path, "novae", dict(preview_every=2))
