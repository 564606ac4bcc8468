"""The CAT nodes inside a real ComfyUI (in-process, CPU, tiny SD1.x / SDXL models built by ComfyUI)."""
from __future__ import annotations

import json
import pytest
import torch

from conftest import adapted_vs_stock_predictions, cancelled_after, pack_module


def _dataset(comfy, folder, mp_clip_vae, res=128):
    ds_mod = pack_module(comfy, "nodes.dataset")
    _, clip, vae = mp_clip_vae
    return ds_mod.build_dataset(folder, vae, clip, ("sks",), "dog", ".txt", res, True)


def _cfg(comfy, **kw):
    T = pack_module(comfy, "cat_train.training")
    return T.TrainConfig(**{"steps": 4, "lr": 1e-2, "seed": 1, **kw})


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_predict_equals_comfy_apply_model(comfy, kind, request):
    """Our DDPM-space predict() == (x_k - apply_model(x_k, sigma)) / sigma, ComfyUI's EPS convention."""
    mp, clip, _ = request.getfixturevalue(f"tiny_{kind}")
    cm = pack_module(comfy, "nodes.comfy_model")
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
    den = cm.ComfyDenoiser(mp)
    assert den.prediction_type == "eps"
    c = cm.comfy_cond(mp, cond, 64, 64)
    assert ("y" in c) == (kind == "sdxl")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    x_t = den.schedule.add_noise(x0, noise, t)
    sigma = den.schedule.sigma(t).float()
    ms_sigma = mp.model.model_sampling.sigma(t.float())
    torch.testing.assert_close(sigma, ms_sigma.float(), rtol=1e-5, atol=0)
    ctx = {k: v.expand(2, *v.shape[1:]) for k, v in c.items()}
    with torch.no_grad():
        ours = den.predict(x_t, t, ctx)
        x_k = x_t / den.schedule.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1)
        kwargs = {"c_crossattn": ctx["context"], **({"y": ctx["y"]} if "y" in ctx else {})}
        denoised = mp.model.apply_model(x_k, ms_sigma, **kwargs)
        theirs = (x_k - denoised) / ms_sigma.view(-1, 1, 1, 1)
    assert ours.abs().mean() > 1e-3  # a real, non-trivial prediction
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_train_patch_roundtrip(comfy, kind, request, dataset_dir, tmp_path):
    """Train; input MODEL unchanged; saved LoRA through stock LoraLoaderModelOnly patches exactly the
    trained modules and predicts what the trainer's adapted UNet predicts."""
    mp, clip, vae = request.getfixturevalue(f"tiny_{kind}")
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    L = pack_module(comfy, "cat_train.training")
    cm = pack_module(comfy, "nodes.comfy_model")
    ds = _dataset(comfy, dataset_dir, (mp, clip, vae))
    assert len(ds.items) == 3 and len(ds.buckets) == 2  # 128x128 and 256x128 -> buckets 128x128, 192x64
    unet = mp.model.diffusion_model
    import comfy.model_management as mm
    mm.load_models_gpu([mp])  # an earlier test's patched clone of this shared model may still hold its weights merged
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    spec = A.LoraSpec(rank=4, alpha=4.0)
    cfg = _cfg(comfy, checkpoint_dir=str(tmp_path / "ck"))
    patched, lora, image, summary, result = tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog"), spec, cfg, "7")

    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert result.steps_done == 4 and image.shape[-1] == 3 and "4/4 steps" in summary
    assert max(w.up.abs().max().item() for w in result.weights.values()) > 0  # it learned something

    # save through the node, load through the stock loader
    save = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_SaveLora"]
    path = save.execute(lora, f"{kind}_roundtrip").result[0]
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert meta["cat_factor"] == "1.0" and meta["ss_network_dim"] == "4" and json.loads(meta["cat_triggers"]) == ["sks"]
        assert len(f.keys()) == 3 * len(result.weights)
    name = path.split("/loras/")[-1]
    stock = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    (loaded,) = stock.load_lora_model_only(mp, name, 1.0)
    patched_keys = {k[len("diffusion_model."):-len(".weight")] for k in loaded.patches}
    assert patched_keys == set(result.weights)  # exactly the trained modules, nothing else
    assert set(patched.patches) == set(loaded.patches)

    # prediction of the stock-patched model == the trainer's adapted UNet
    ex = tr.model_examples(mp, ds, L.CatLossConfig(1.0, "class", "dog"))[0]
    base, adapted, stock_pred, restored = adapted_vs_stock_predictions(
        comfy, mp, cm.ComfyDenoiser(mp), ex, result.weights, spec, loaded, torch.tensor([500]))
    assert (adapted - base).abs().max() > 1e-4  # the LoRA changes the prediction...
    torch.testing.assert_close(stock_pred, adapted, atol=1e-5, rtol=1e-5)  # ...identically through ComfyUI's patching (merged vs unmerged fp32 rounding reached 2.2e-6)
    assert torch.equal(restored, base)  # and the input MODEL is bit-identical again


def test_bad_save_names_refused(comfy, tmp_path):
    lio = pack_module(comfy, "nodes.lora_io")
    for bad in ("../evil", "a/../../evil", "/abs/evil", "..", "", "C:evil", "a\\..\\b"):
        with pytest.raises(ValueError, match="outside the loras folder|empty"):
            lio.safe_lora_path(tmp_path, bad)
    p1 = lio.safe_lora_path(tmp_path, "ok")
    p1.write_bytes(b"x")
    assert lio.safe_lora_path(tmp_path, "ok").name == "ok_00001.safetensors"  # never overwrites
    save = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_SaveLora"]
    with pytest.raises(ValueError, match="outside the loras folder"):
        save.execute({}, "../escape")


def test_cancel_keeps_checkpoint_and_resumes(comfy, tiny_sd15, dataset_dir, tmp_path):
    import comfy.model_management as mm

    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    L = pack_module(comfy, "cat_train.training")
    T = pack_module(comfy, "cat_train.training")
    ds = _dataset(comfy, dataset_dir, tiny_sd15)
    mm.load_models_gpu([mp])  # the MODEL's own weights, not a still-loaded patched clone's
    before = {k: v.clone() for k, v in mp.model.diffusion_model.state_dict().items()}
    cfg = _cfg(comfy, steps=6, checkpoint_dir=str(tmp_path / "ck"))
    with cancelled_after(2, total=6) as seen:  # the user presses Cancel after step 2 (of the 6-step bar, not preparation's)
        tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0), cfg)
    assert seen == [1, 2]  # stopped within one step
    ck = T.latest_checkpoint(tmp_path / "ck")
    assert ck is not None and ck.name == "cat-step000002.pt"
    state = torch.load(ck, weights_only=True)
    assert state["step"] == 2 and len(state["lora"]) > 0
    after = mp.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # resume finishes the run
    _, _, _, _, res = tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0), cfg,
                                        resume=str(ck))
    assert res.steps_done == 6 and [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]


def test_gradient_checkpointing_same_lora_and_unwrapped_after(comfy, tiny_sd15, dataset_dir, tmp_path):
    mp, clip, vae = tiny_sd15
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    L = pack_module(comfy, "cat_train.training")
    ds = _dataset(comfy, dataset_dir, tiny_sd15)
    blocks = [layer for b in [*mp.model.diffusion_model.input_blocks, mp.model.diffusion_model.middle_block] for layer in b]
    calls = []
    from torch.utils import checkpoint as ckpt_mod
    real = ckpt_mod.checkpoint

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    ckpt_mod.checkpoint = counting
    try:
        res = [tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0),
                                 _cfg(comfy, steps=2, gradient_checkpointing=gc, checkpoint_dir=str(tmp_path / str(gc))))[4]
               for gc in (False, True)]
    finally:
        ckpt_mod.checkpoint = real
    assert len(calls) > 0  # blocks really ran under checkpoint
    assert all("forward" not in vars(b) for b in blocks)  # the shared UNet is unwrapped again
    for k, w in res[0].weights.items():
        torch.testing.assert_close(res[1].weights[k].up, w.up, atol=1e-6, rtol=1e-5)


def test_v_prediction_model(comfy, dataset_dir, tmp_path):
    """v models: predict() is the raw UNet output v, which ComfyUI turns into x0 by its V_PREDICTION rule."""
    from tiny_models import tiny_model

    mp, clip, vae = tiny_model("sd15", seed=3, v_prediction=True)
    cm = pack_module(comfy, "nodes.comfy_model")
    den = cm.ComfyDenoiser(mp)
    assert den.prediction_type == "v"
    c = cm.comfy_cond(mp, clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog")), 64, 64)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
    with torch.no_grad():
        v = den.predict(x_t, t, c)
        s = mp.model.model_sampling.sigma(t.float())
        x_k = x_t * (s * s + 1).sqrt()
        x0 = mp.model.apply_model(x_k, s, c_crossattn=c["context"])
    torch.testing.assert_close(x0, x_k / (s * s + 1) - v * s / (s * s + 1).sqrt(), atol=1e-5, rtol=1e-4)
    tr = pack_module(comfy, "nodes.trainer")
    A = pack_module(comfy, "cat_train.adapters.lora")
    L = pack_module(comfy, "cat_train.training")
    ds = _dataset(comfy, dataset_dir, (mp, clip, vae))
    res = tr.train_on_model(mp, ds, L.CatLossConfig(0.0, "strip"), A.LoraSpec(rank=2, alpha=2.0),
                            _cfg(comfy, steps=2, checkpoint_dir=str(tmp_path)))[4]
    assert res.steps_done == 2 and all(h["keep"] == 0 for h in res.history)  # alpha 0: no preservation term


def test_dataset_errors_name_the_fix(comfy, tiny_sd15, tmp_path):
    ds_mod = pack_module(comfy, "nodes.dataset")
    _, clip, vae = tiny_sd15
    with pytest.raises(ValueError, match="nope does not exist.*put the training images"):
        ds_mod.build_dataset(tmp_path / "nope", vae, clip, ("sks",), "dog", ".txt", 128, True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ds_mod.build_dataset(tmp_path / "empty", vae, clip, ("sks",), "dog", ".txt", 128, True)
    from tiny_models import make_images
    folder = make_images(tmp_path / "10_dog", n=2)  # kohya repeat folder inside the dataset root
    with pytest.raises(ValueError, match="at least one non-empty trigger"):
        ds_mod.build_dataset(tmp_path, vae, clip, (), "dog", ".txt", 128, True)
    ds = ds_mod.build_dataset(tmp_path, vae, clip, ("sks",), "dog", ".txt", 128, False)
    assert [it[3] for it in ds.items] == [10, 10] and ds.buckets == {(128, 128): 2}  # no buckets: square crops
    assert [it[1] for it in ds.items] == ["sks, dog", "a photo of sks dog"]  # captionless image: trigger + class word
    assert folder.exists()


def test_core_kohya_names_match_comfyui_map(comfy, tiny_sd15):
    """The core's ldm->diffusers names (read off the module tree) agree with ComfyUI's unet_to_diffusers."""
    from comfy.utils import unet_to_diffusers

    ldm_to_diffusers = pack_module(comfy, "cat_train.families.ldm_names").ldm_to_diffusers
    mp = tiny_sd15[0]
    by_ldm = {v[: -len(".weight")]: k[: -len(".weight")]
              for k, v in unet_to_diffusers(mp.model.model_config.unet_config).items() if k.endswith(".weight")}
    names = ldm_to_diffusers(n for n, _ in mp.model.diffusion_model.named_modules())
    paths = [n for n, m in mp.model.diffusion_model.named_modules() if n.endswith(("to_q", "to_out.0", "proj_in", "ff.net.2"))]
    assert len(paths) > 8
    for p in paths:
        assert names[p] == by_ldm[p], p


def test_model_file_name_follows_the_model_link_to_its_loader(comfy):
    """kohya's ss_sd_model_name: the trainer reads the checkpoint file off the queued graph, through nodes that pass
    the MODEL on, and says nothing rather than guess where the graph does not name one."""
    name = pack_module(comfy, "nodes.common").model_file_name
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
         "5": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "style.safetensors", "strength_model": 1.0}},
         "6": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["5", 0], "sampling": "v_prediction", "zsnr": False}},
         "7": {"class_type": "CAT_LoraTrainer", "inputs": {"model": ["6", 0], "checkpoint_name": "run"}},
         "8": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
         "9": {"class_type": "CAT_LoraTrainer", "inputs": {"model": ["8", 0]}},
         "10": {"class_type": "CAT_LoraTrainer", "inputs": {"model": ["11", 0]}},
         "11": {"class_type": "SomeModelMaker", "inputs": {"seed": 3}},
         "12": {"class_type": "A", "inputs": {"model": ["13", 0]}}, "13": {"class_type": "B", "inputs": {"model": ["12", 0]}}}
    assert name(g, "7") == "v1-5.safetensors" and name(g, 7) == "v1-5.safetensors"
    assert name(g, "9") == "flux1-dev.safetensors"
    assert name(g, "10") == "" and name(g, "12") == "" and name(None, "7") == "" and name(g, None) == ""
