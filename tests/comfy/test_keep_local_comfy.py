"""The layer-local keep estimator in a real ComfyUI: CAT Loss Config's last optional widget, training on ComfyUI's own
tiny SD1.x, SD3 and Flux models (the estimator hooks the injected layers of ComfyUI's modules, whatever the family and
its output space), a graph through ComfyUI's executor, the LoRA header, and the input MODEL untouched."""
from __future__ import annotations

import asyncio
import importlib
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import pack_module, run_prompt


def test_keep_estimator_widget_comes_last_and_reaches_the_lora_header(comfy, tiny_sd15, dataset_dir):
    nodes = pack_module(comfy, "nodes")
    listed = {n.define_schema().node_id: n for n in asyncio.run(nodes.CatExtension().get_node_list())}
    inputs = listed["CAT_LossConfig"].define_schema().inputs
    assert [i.id for i in inputs][-3:] == ["keep_every", "keep_fraction", "keep_estimator"]  # saved graphs keep their order
    assert inputs[-1].optional and inputs[-1].options == ["exact", "local"] and inputs[-1].default == "exact"
    assert listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "").result[0].keep_estimator == "exact"

    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    A, T = pack_module(comfy, "cat_train.adapters.lora"), pack_module(comfy, "cat_train.training")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    loss = listed["CAT_LossConfig"].execute(1.0, "class", "dog", "", "", keep_estimator="local").result[0]
    importlib.import_module("comfy.model_management").unload_all_models()
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    _, lora, _, _, res = tr.train_on_model(mp, ds, loss, A.LoraSpec(rank=4, alpha=4.0), T.TrainConfig(steps=3, lr=1e-2, seed=1))
    keep = [h["keep"] for h in res.history]
    assert keep[0] == 0 < keep[-1]  # LoRA B = 0 at step 1: no layer changes anything on y; then it does
    assert (lora.metadata["cat_keep_estimator"], lora.metadata["cat_keep_local_weights"]) == ("local", "unit")
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_local_keep_on_flow_models(comfy, kind, dataset_dir):
    """Velocity targets and joint attention: every adapted layer of ComfyUI's MMDiT / Flux is run by the frozen pass with
    the batch first (the estimator refuses otherwise), the term is 0 at step 1 and live after, one adapted row per image."""
    from tiny_models import tiny_model

    mp, clip, vae = tiny_model(kind, seed=11)
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    tr = pack_module(comfy, "nodes.trainer")
    A, T, L = (pack_module(comfy, m) for m in ("cat_train.adapters.lora", "cat_train.training", "cat_train.training"))
    importlib.import_module("comfy.model_management").unload_all_models()
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    *_, res = tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog", keep_estimator="local"),
                                A.LoraSpec(rank=4, alpha=4.0, preset="attn_ff"), T.TrainConfig(steps=3, lr=1e-2, seed=1))
    keep = [h["keep"] for h in res.history]
    assert keep[0] == 0 < keep[-1]
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("estimator", ["local", "exact"])
def test_a_graph_with_the_widget_trains_and_its_file_records_it(comfy, test_checkpoint_node, dataset_dir, estimator):
    """An API graph sets the widget; ComfyUI validates it against the schema and runs it: the saved LoRA's header says
    which estimator trained it (exact CAT's files carry no key, as every file from before the option)."""
    from test_bad_inputs import graph

    name = f"keep_local_{uuid.uuid4().hex[:8]}"
    g = graph(steps=3, checkpoint_name=name, save_name=name)
    g["3"]["inputs"]["keep_estimator"] = estimator
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    path = Path(comfy.folder_paths.get_folder_paths("loras")[0]) / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        up = [f.get_tensor(k) for k in f.keys() if k.endswith("_up.weight")]
    assert up and max(float(t.abs().max()) for t in up) > 0  # it trained
    if estimator == "local":
        assert (meta["cat_keep_estimator"], meta["cat_keep_local_weights"]) == ("local", "unit")
    else:
        assert "cat_keep_estimator" not in meta and "cat_keep_local_weights" not in meta
