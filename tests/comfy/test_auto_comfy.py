"""Auto preservation inside a real ComfyUI: the Auto Preservation node feeds CAT Loss Config's last optional input,
training on ComfyUI's tiny SD1.x UNet measures the probes (SD's cross-attention conditionings) and adds the worst,
the LoRA header names them, and the model comes back bit-identical."""
from __future__ import annotations

import asyncio
import json

import torch

from conftest import pack_module


def test_auto_preservation_node_is_the_loss_config_s_optional_input_after_apt(comfy):
    nodes = pack_module(comfy, "nodes")
    listed = {n.define_schema().node_id: n for n in asyncio.run(nodes.CatExtension().get_node_list())}
    assert "CAT_AutoPreservation" in listed
    inputs = listed["CAT_LossConfig"].define_schema().inputs
    # appended after apt (and before the later keep_every, keep_fraction, keep_estimator): saved graphs' widget order is unchanged
    assert [i.id for i in inputs][-5:] == ["apt", "auto", "keep_every", "keep_fraction", "keep_estimator"]
    assert inputs[-4].optional and "CAT_AUTO_PRESERVATION" in str(inputs[-4].get_io_type())
    auto = listed["CAT_AutoPreservation"].execute(every=25, source="list", probes="cat\n\n wolf \n", top_k=1,
                                                  threshold=0.02).result[0]
    assert auto.probes == ("cat", "wolf") and auto.every == 25 and auto.top_k == 1 and auto.threshold == 0.02
    cfg = listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "", auto=auto).result[0]
    assert cfg.auto is auto and not cfg.apt.active
    assert not listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "").result[0].auto.active  # off without the node


def test_auto_preservation_trains_on_a_comfy_model_and_the_lora_names_the_probes_added(comfy, tiny_sd15, dataset_dir):
    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    loss_nodes = pack_module(comfy, "nodes.loss_config")
    auto_nodes = pack_module(comfy, "nodes.auto_preservation")
    A = pack_module(comfy, "cat_train.adapters.lora")
    T = pack_module(comfy, "cat_train.training")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    auto = auto_nodes.AutoPreservationNode.execute(every=2, source="list", probes="cat\nwolf\ncar", top_k=2,
                                                   threshold=0.0, points=2).result[0]
    loss_cfg = loss_nodes.CatLossConfigNode.execute(1.0, "class", "dog", "", "", auto=auto).result[0]
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    _, lora, _, _, res = tr.train_on_model(mp, ds, loss_cfg, A.LoraSpec(rank=4, alpha=4.0),
                                           T.TrainConfig(steps=4, lr=1e-2, seed=1))
    added = res.history[-1]["auto_added"]
    assert [s for _, s, _ in added] == [2, 2] and all(d > 0 for _, _, d in added)  # measured at step 2, two added
    stored = json.loads(lora.metadata["cat_auto_preservation_added"])
    assert [a["probe"] for a in stored] == [p for p, _, _ in added] and {a["probe"] for a in stored} <= {"cat", "wolf", "car"}
    assert json.loads(lora.metadata["cat_auto_preservation"])["every"] == 2
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _nearest(auto_nodes, **kw):
    return auto_nodes.AutoPreservationNode.execute(every=2, source="nearest", probes="", top_k=2, threshold=0.0, points=2,
                                                   neighbours=3, rule="relative", first=1, **kw).result[0]


def test_nearest_ranks_with_clip_l_uncached_and_the_lora_names_the_chosen_probes(comfy, tiny_sd15, dataset_dir):
    """source nearest on ComfyUI's tiny SD1.x: the ranking encodes the whole vocabulary through CLIP-L in batches
    without filling the dataset's caption cache, the chosen probes are measured from step 1, and the header records them."""
    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    loss_nodes = pack_module(comfy, "nodes.loss_config")
    auto_nodes = pack_module(comfy, "nodes.auto_preservation")
    A = pack_module(comfy, "cat_train.adapters.lora")
    T = pack_module(comfy, "cat_train.training")
    N = pack_module(comfy, "cat_train.terms.nearest")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    auto = _nearest(auto_nodes)
    assert (auto.source, auto.neighbours, auto.rule, auto.first) == ("nearest", 3, "relative", 1)
    # the batched CLIP-L rows are ComfyUI's own one-prompt encode, chunk for chunk
    rows = ds.rank_text(["a photo of dog", "a photo of teddy bear on a sofa"])
    for i, p in enumerate(["a photo of dog", "a photo of teddy bear on a sofa"]):
        assert torch.allclose(rows[i], clip.encode_from_tokens(clip.tokenize(p))[0].float().cpu(), atol=1e-5)
    loss_cfg = loss_nodes.CatLossConfigNode.execute(1.0, "class", "dog", "", "", auto=auto).result[0]
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    _, lora, _, _, res = tr.train_on_model(mp, ds, loss_cfg, A.LoraSpec(rank=4, alpha=4.0),
                                           T.TrainConfig(steps=2, lr=1e-2, seed=1))
    assert len(ds._text_cache) < 30  # the captions, their y and the 3 probes' prompts per image: not the 5,789 words
    near = json.loads(lora.metadata["cat_auto_preservation_nearest"])
    assert [n["class_word"] for n in near] == ["dog"] and len(near[0]["probes"]) == 3
    assert near[0]["candidates"] + near[0]["left_out"] == len(N.vocabulary())
    sims = [s for _, s in near[0]["probes"]]
    assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    added = json.loads(lora.metadata["cat_auto_preservation_added"])
    assert [a["step"] for a in added] == [1, 1] and {a["probe"] for a in added} <= {w for w, _ in near[0]["probes"]}
    assert res.history[-1]["auto_nearest"] == near
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
