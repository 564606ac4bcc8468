"""APT inside a real ComfyUI: the APT Options node feeds the Loss Config; training on ComfyUI's own tiny SD1.x UNet
hooks its cross-attention and block outputs, leaves the model bit-identical, and the LoRA records every APT setting."""
from __future__ import annotations

import json

import torch

from conftest import pack_module


def test_apt_trains_on_a_comfy_model_and_records_its_settings(comfy, tiny_sd15, dataset_dir):
    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    loss_nodes = pack_module(comfy, "nodes.loss_config")
    apt_nodes = pack_module(comfy, "nodes.apt")
    A = pack_module(comfy, "cat_train.adapters.lora")
    T = pack_module(comfy, "cat_train.training")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    apt = apt_nodes.AptOptionsNode.execute(adaptive=1.0, stabilize=5.0, align=1000.0, bins=4, augment="zoom, rotate, flip").result[0]
    loss_cfg = loss_nodes.CatLossConfigNode.execute(1.0, "class", "dog", "", "", apt=apt).result[0]
    assert loss_cfg.apt.augment_ops == ("zoom", "rotate", "flip") and loss_cfg.apt.bins == 4
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    _, lora, _, _, res = tr.train_on_model(mp, ds, loss_cfg, A.LoraSpec(rank=4, alpha=4.0),
                                           T.TrainConfig(steps=4, lr=1e-2, seed=1))
    hist = res.history
    assert len(hist) == 4 and hist[-1]["stabilize"] > 0 and hist[-1]["align"] > 0  # ComfyUI's blocks and attn2 were hooked
    assert len(hist[-1]["indicator"]) == 4
    stored = json.loads(lora.metadata["cat_apt"])
    assert stored["stabilize"] == 5.0 and stored["align"] == 1000.0 and stored["augment_ops"] == ["zoom", "rotate", "flip"]
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks for m in mp.model.diffusion_model.modules())  # APT's hooks are gone
    assert stored["form"] == "paper" and stored["fill"] == "black" and stored["stabilize_stat"] == "std"  # the node's defaults
    # align_skip_triggers: the trainer finds the trigger's tokens with CLIP's tokenizer, only when asked
    assert all(e.trigger_tokens == () for e in tr.model_examples(mp, ds, loss_cfg))
    skip = apt_nodes.AptOptionsNode.execute(adaptive=1.0, stabilize=5.0, align=1000.0, bins=4, augment="zoom",
                                            form="relative", align_skip_triggers=True).result[0]
    assert (skip.form, skip.align_skip_triggers, skip.fill) == ("relative", True, "black")
    skip_cfg = loss_nodes.CatLossConfigNode.execute(1.0, "class", "dog", "", "", apt=skip).result[0]
    exs = tr.model_examples(mp, ds, skip_cfg)
    assert exs and all(len(e.trigger_tokens) >= 1 and 0 not in e.trigger_tokens for e in exs)  # never the start token


def test_apt_options_node_is_registered_and_feeds_the_loss_config(comfy):
    import asyncio

    nodes = pack_module(comfy, "nodes")
    listed = {n.define_schema().node_id: n for n in asyncio.run(nodes.CatExtension().get_node_list())}
    assert "CAT_AptOptions" in listed
    inputs = {i.id: i for i in listed["CAT_LossConfig"].define_schema().inputs}
    assert inputs["apt"].optional and "CAT_APT_OPTIONS" in str(inputs["apt"].get_io_type())
    assert listed["CAT_AptOptions"].validate_inputs(augment="zoom, warp") == "augment: unknown warp; choose from flip, zoom, rotate, shift, color"
    plain = listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "").result[0]
    assert not plain.apt.active  # without the node, APT stays off
