"""Cheaper preservation in a real ComfyUI: the CAT Loss Config node's last two optional widgets, the training run on
ComfyUI's tiny SD1.x UNet and the LoRA header that records them."""
from __future__ import annotations

import asyncio

from conftest import pack_module


def test_keep_widgets_come_last_and_reach_the_lora_header(comfy, tiny_sd15, dataset_dir):
    nodes = pack_module(comfy, "nodes")
    listed = {n.define_schema().node_id: n for n in asyncio.run(nodes.CatExtension().get_node_list())}
    inputs = listed["CAT_LossConfig"].define_schema().inputs
    assert [i.id for i in inputs][-3:-1] == ["keep_every", "keep_fraction"] and all(i.optional for i in inputs[-3:-1])
    assert [i.id for i in inputs][:7] == ["cat_factor", "preservation", "class_word", "token_weights",
                                          "preservation_prompts", "apt", "auto"]  # saved graphs keep their order
    plain = listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "").result[0]
    assert (plain.keep_every, plain.keep_fraction) == (1, 1.0)

    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    T = pack_module(comfy, "cat_train.training")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    loss_cfg = listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "", keep_every=2, keep_fraction=0.5).result[0]
    _, lora, _, _, res = tr.train_on_model(mp, ds, loss_cfg, A.LoraSpec(rank=4, alpha=4.0), T.TrainConfig(steps=4, lr=1e-2, seed=1))
    assert [h["keep"] == 0 for h in res.history][1::2] == [True, True]  # steps 2 and 4 carry no CAT term
    assert (lora.metadata["cat_keep_every"], lora.metadata["cat_keep_fraction"]) == ("2", "0.5")
