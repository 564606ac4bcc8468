"""DoRA, LoHa, LoKr (and LoRA) files through ComfyUI's stock LoraLoaderModelOnly: the loaded model predicts what the
trainer's peft adapter predicts (docs/algorithms.md has the figures)."""
from __future__ import annotations

import pytest
import torch

from conftest import adapted_vs_stock_predictions, pack_module

FILE_KEYS = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
             "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
             "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
             "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}  # LoKr: w2 full or factored per layer


CASES = [("sd15", "lora", 4), ("sd15", "dora", 4), ("sd15", "loha", 4), ("sd15", "lokr", 4), ("sd15", "lokr", 2),
         ("sdxl", "dora", 4), ("sdxl", "loha", 4), ("sdxl", "lokr", 2),
         ("flux", "dora", 4), ("flux", "loha", 4), ("flux", "lokr", 2), ("sd3", "lokr", 4)]


@pytest.fixture(scope="module")
def models(comfy, tiny_sd15, tiny_sdxl):
    from tiny_models import tiny_model

    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "flux": tiny_model("flux", seed=11), "sd3": tiny_model("sd3", seed=11)}


@pytest.mark.parametrize("kind,algo,rank", CASES)
def test_algorithm_file_through_stock_loader_predicts_as_trained(comfy, models, dataset_dir, tmp_path, kind, algo, rank):
    import comfy.model_management as mm
    from safetensors import safe_open

    mp, clip, vae = models[kind]
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    L = pack_module(comfy, "cat_train.training")
    T = pack_module(comfy, "cat_train.training")
    cm = pack_module(comfy, "nodes.comfy_model")
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    unet = mp.model.diffusion_model
    mm.load_models_gpu([mp])  # an earlier test's patched clone of this shared model may still hold its weights merged
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flow = kind in ("flux", "sd3")
    # UNets: `full`, so the resnet convs too; flow transformers: attention and MLPs (their `full` adds modulation)
    spec = A.LoraSpec(rank=rank, alpha=2.0 * rank, preset="attn_ff" if flow else "full", algorithm=algo)
    cfg = T.TrainConfig(steps=4, lr=1e-2, seed=1, checkpoint_dir=str(tmp_path / "ck"))
    loss = L.CatLossConfig(1.0, "class", "dog")
    patched, lora, _, summary, result = tr.train_on_model(mp, ds, loss, spec, cfg, "7")
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert summary.startswith({"lora": "CAT LoRA", "dora": "CAT DoRA", "loha": "CAT LoHa", "lokr": "CAT LoKr"}[algo])

    save = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_SaveLora"]
    path = save.execute(lora, f"algo_{kind}_{algo}_{rank}").result[0]
    with safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    suffixes = {k.split(".", 1)[1] for k in keys}
    assert suffixes <= FILE_KEYS[algo] and "alpha" in suffixes, suffixes
    assert (meta["ss_network_module"], meta.get("cat_algorithm")) == (
        ("networks.lora", None) if algo == "lora" else ("lycoris.kohya", algo))

    stock = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    (loaded,) = stock.load_lora_model_only(mp, path.split("/loras/")[-1], 1.0)
    patched_keys = {k[len("diffusion_model."):-len(".weight")] for k in loaded.patches}
    assert patched_keys == set(result.weights)  # every adapted module mapped, nothing else
    kinds = {type(p[1]).__name__ for v in loaded.patches.values() for p in v}  # ComfyUI's adapter class per patch
    assert kinds == {{"lora": "LoRAAdapter", "dora": "LoRAAdapter", "loha": "LoHaAdapter", "lokr": "LoKrAdapter"}[algo]}

    ex = tr.model_examples(mp, ds, loss)[0]
    worst = effect = 0.0
    for t in ((200.0, 600.0) if flow else (100, 500, 900)):
        base, adapted, stock_pred, restored = adapted_vs_stock_predictions(
            comfy, mp, cm.ComfyDenoiser(mp), ex, result.weights, spec, loaded, torch.tensor([t]))
        assert (adapted - base).abs().max() > 1e-3  # the adapter changes the prediction...
        torch.testing.assert_close(stock_pred, adapted, atol=1e-4, rtol=1e-4)  # ...as ComfyUI's merged weights do
        assert torch.equal(restored, base)  # and the input MODEL is bit-identical again
        worst = max(worst, (stock_pred - adapted).abs().max().item())
        effect = max(effect, (adapted - base).abs().max().item())
    print(f"{kind} {algo} rank {rank}: max |stock - peft| {worst:.3g}, max |adapted - base| {effect:.3g}")


def test_training_options_node_sets_the_algorithm(comfy):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_TrainingOptions"]
    A = pack_module(comfy, "cat_train.adapters.lora")
    TO = pack_module(comfy, "nodes.training_options")
    (widget,) = [i for i in node.define_schema().inputs if i.id == "algorithm"]
    assert widget.options == ["lora", "dora", "loha", "lokr"] and widget.default == "lora"
    out = node.execute(algorithm="lokr").result[0]
    spec = A.LoraSpec(rank=8, alpha=8.0, preset="attn", **TO.options_for(out, A.LoraSpec))
    assert spec.algorithm == "lokr"
    assert A.LoraSpec(rank=8, **TO.options_for(None, A.LoraSpec)).algorithm == "lora"  # unconnected: LoRA as before
    assert node.validate_inputs(algorithm="loha") is True
    assert node.validate_inputs(algorithm="oft") == "algorithm 'oft' is not one of lora, dora, loha, lokr."


def test_shipped_graph_with_options_node_trains_and_samples_with_loha(comfy, test_checkpoint_node, tiny_open_clip,
                                                                       dataset_dir):
    """The SD1.5 workflow as shipped, plus a CAT Training Options node (algorithm loha) on the trainer's `options`
    input, through ComfyUI's executor: it trains LoHa, samples with it, and saves a LoHa file."""
    import json
    from pathlib import Path

    from conftest import ROOT, run_prompt, shrink_for_cpu
    from safetensors import safe_open

    g = shrink_for_cpu(json.loads((ROOT / "workflows" / "api" / "cat_sd15_train_kps.api.json").read_text()), "sd15",
                       dataset_dir, tiny_open_clip)
    trainer = next(k for k, n in g.items() if n["class_type"] == "CAT_LoraTrainer")
    save_node = next(k for k, n in g.items() if n["class_type"] == "CAT_SaveLora")
    g["90"] = {"class_type": "CAT_TrainingOptions", "inputs": {"algorithm": "loha"}}
    g[trainer]["inputs"]["options"] = ["90", 0]
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    shown = {g[k]["inputs"]["source"][0]: out[k]["text"][0] for k, n in g.items() if n["class_type"] == "PreviewAny"}
    assert shown[trainer].startswith("CAT LoHa: 3/3 steps")
    saved = Path(out[save_node]["text"][0])
    with safe_open(str(saved), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["cat_algorithm"] == "loha" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert keys and all(k.endswith((".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha")) for k in keys)
    imgs = [k for k, n in g.items() if n["class_type"] == "SaveImage"]
    assert all(out[k]["images"] for k in imgs)  # sampled with the LoHa-patched MODEL
