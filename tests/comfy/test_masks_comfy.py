"""Masked training inside a real ComfyUI: a dataset folder with mask files and an alpha channel trains through the
nodes (CAT Dataset reads the masks -> CAT Training Options mask_floor / mask_keep -> trainer), and the LoRA records
it; CAT Dataset's widgets are unchanged (shipped workflows keep their widget values)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pack_module, run_prompt


def masked_folder(root: Path) -> Path:
    """Three 128 px images: one with a -masklabel file (subject on the left quarter), one with an alpha channel (left
    half opaque), one with neither."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text("a photo of sks dog")
    m = np.zeros((128, 128), np.uint8)
    m[:, :32] = 255
    Image.fromarray(m, "L").save(root / "a-masklabel.png")
    rgba = np.concatenate([rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), np.zeros((128, 128, 1), np.uint8)], -1)
    rgba[:, :64, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "c.png")
    (root / "c.txt").write_text("a photo of sks dog")
    return root


def graph(folder: str, floor: float, keep: float) -> dict:
    from test_bad_inputs import _defaults

    return {
        "1": {"class_type": "CATTest_TinyCheckpoint", "inputs": {"kind": "sd15"}},
        "2": {"class_type": "CAT_Dataset", "inputs": {"vae": ["1", 2], "clip": ["1", 1], "folder": folder, "triggers": "sks",
                                                      "class_word": "dog", "caption_extension": ".txt", "resolution": 128,
                                                      "buckets": True}},
        "3": {"class_type": "CAT_LossConfig", "inputs": {"cat_factor": 1.0, "preservation": "class", "class_word": "dog",
                                                         "token_weights": ""}},
        "6": {"class_type": "CAT_TrainingOptions", "inputs": {"mask_floor": floor, "mask_keep": keep}},
        "4": {"class_type": "CAT_LoraTrainer", "inputs": {**_defaults("CAT_LoraTrainer"),
              "model": ["1", 0], "dataset": ["2", 0], "loss_config": ["3", 0], "options": ["6", 0], "rank": 2,
              "lora_alpha": 2.0, "steps": 3, "learning_rate": 0.01, "save_every": 0, "checkpoint_name": f"{folder}_run",
              "resume_from": ""}},
        "5": {"class_type": "CAT_SaveLora", "inputs": {"lora": ["4", 1], "name": f"{folder}_lora"}},
    }


def test_masked_dataset_trains_through_the_nodes(comfy, test_checkpoint_node):
    from safetensors import safe_open

    masked_folder(Path(comfy.folder_paths.get_input_directory()) / "cat_mask_ds")
    ex = run_prompt(graph("cat_mask_ds", 0.1, 1.0))
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    schema = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_Dataset"].define_schema()
    assert [i.id for i in schema.inputs] == ["vae", "clip", "folder", "triggers", "class_word", "caption_extension",
                                             "resolution", "buckets"]
    with safe_open(out["5"]["text"][0], "pt") as f:
        meta = f.metadata()
    assert (meta["cat_mask_floor"], meta["cat_mask_keep"]) == ("0.1", "1.0")
    assert meta["ss_num_train_images"] == "3"  # a-masklabel.png is not a training image


def test_masks_reach_the_examples_and_the_loss(comfy, tiny_sd15):
    mp, clip, vae = tiny_sd15
    folder = masked_folder(Path(comfy.folder_paths.get_input_directory()) / "cat_mask_ds2")
    nd = pack_module(comfy, "nodes.dataset")
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    T = pack_module(comfy, "cat_train.training")
    L = pack_module(comfy, "cat_train.training")
    ds = nd.build_dataset(folder, vae, clip, ("sks",), "dog", ".txt", 128, True)  # the node's call: masks auto
    assert "3 images in 1 bucket(s): 128x128: 3; 2 with masks" in nd.info(ds)
    assert "masks (auto): 2 of 3 images have a mask" in nd.info(ds)
    lat_hw = tuple(ds.items[0][0].shape[-2:])
    assert [None if m is None else tuple(m.shape) for m in ds.masks] == [(1, *lat_hw), None, (1, *lat_hw)]
    assert ds.masks[0].mean().item() == 0.25 and ds.masks[2].mean().item() == 0.5  # a: left quarter; c: left half
    off = nd.build_dataset(folder, vae, clip, ("sks",), "dog", ".txt", 128, True, masks="off")
    assert off.masks == [None] * 3 and "masks is off" in nd.info(off)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ds.items, off.items))  # same latents either way
    loss = L.CatLossConfig(1.0, "class", "dog", mask_floor=0.1, mask_keep=1.0)
    exs = tr.model_examples(mp, ds, loss)
    assert [e.mask is not None for e in exs] == [True, False, True]
    unused = tr.model_examples(mp, ds, L.CatLossConfig(1.0, "class", "dog"))  # masks weigh nothing: not on the examples
    assert all(e.mask is None for e in unused)
    importlib.import_module("comfy.model_management").unload_all_models()  # a LoRA-patched clone loaded by an earlier test leaves its patches in the
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}  # shared weights until then
    *_, res = tr.train_on_model(mp, ds, loss, A.LoraSpec(rank=4, alpha=4.0), T.TrainConfig(steps=3, lr=1e-2, seed=1))
    assert len(res.history) == 3 and res.history[-1]["background_keep"] > 0
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.dumps(res.history[-1])  # plain numbers: the live view and checkpoints store them


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_masked_training_on_flow_models(comfy, kind, tmp_path):
    """16-channel latents and velocity targets: the masks follow the latent's size and the keep term comes alive."""
    from tiny_models import tiny_model

    mp, clip, vae = tiny_model(kind, seed=11)
    folder = masked_folder(tmp_path / "ds")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(folder, vae, clip, ("sks",), "dog", ".txt", 128, True)
    assert all(m is None or m.shape[-2:] == lat.shape[-2:] for m, (lat, *_) in zip(ds.masks, ds.items))
    tr = pack_module(comfy, "nodes.trainer")
    A, T, L = (pack_module(comfy, m) for m in ("cat_train.adapters.lora", "cat_train.training", "cat_train.training"))
    importlib.import_module("comfy.model_management").unload_all_models()  # a LoRA-patched clone loaded by an earlier test leaves its patches in the
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}  # shared weights until then
    *_, res = tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog", mask_floor=0.0, mask_keep=1.0),
                                A.LoraSpec(rank=4, alpha=4.0, preset="attn_ff"), T.TrainConfig(steps=3, lr=1e-2, seed=1))
    bg = [h["background_keep"] for h in res.history]
    assert bg[0] < 1e-8 < bg[-1]  # LoRA B = 0 at step 1: adapted == frozen on the background
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
