"""Training on the model the way a GPU holds it: bf16/fp16 weights stay as loaded, LoRA is fp32, the
prediction type comes from the patcher, any attention backend trains, upstream patches apply or are refused."""
from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from conftest import pack_module
from tiny_models import tiny_model


def _dataset(comfy, folder, clip, vae, res=64):
    return pack_module(comfy, "nodes.dataset").build_dataset(folder, vae, clip, ("sks",), "dog", ".txt", res, True)


def _train(comfy, mp, ds, alpha=1.0, steps=3, compute="auto", **kw):
    tr = pack_module(comfy, "nodes.trainer")
    A, L, T = (pack_module(comfy, f"cat_train.{m}") for m in ("adapters.lora", "training", "training"))
    cfg = T.TrainConfig(steps=steps, lr=1e-2, seed=1, **kw)
    return tr.train_on_model(mp, ds, L.CatLossConfig(alpha, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0), cfg,
                             compute=compute)


def _state(mp):
    """Every UNet tensor's bits, dtype and device, for a before/after comparison in the test itself."""
    return {k: (v.dtype, v.device, v.clone()) for k, v in mp.model.diffusion_model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and a[k][1] == b[k][1] and torch.equal(a[k][2], b[k][2]) for k in a)


@pytest.mark.parametrize("kind,dtype,compute", [("sd15", torch.bfloat16, "auto"), ("sdxl", torch.bfloat16, "auto"),
                                                ("sd15", torch.float16, "auto"), ("sd15", torch.bfloat16, "fp32"),
                                                ("sd15", torch.float8_e4m3fn, "bf16")])
def test_low_precision_model_trains_and_stays_as_loaded(comfy, dataset_dir, kind, dtype, compute):
    mp, clip, vae = tiny_model(kind, seed=5, dtype=dtype)
    ds = _dataset(comfy, dataset_dir, clip, vae)
    before = _state(mp)
    assert collections.Counter(v[0] for v in before.values()) == {dtype: len(before)}
    patched, lora, _, _, res = _train(comfy, mp, ds, compute=compute)
    assert _same(before, _state(mp))  # bits, dtype and device of every tensor
    assert all(w.down.dtype == torch.float32 and w.up.dtype == torch.float32 for w in res.weights.values())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert max(w.up.abs().max().item() for w in res.weights.values()) > 0  # it learned
    assert res.history[0]["keep"] < 1e-6 < res.history[-1]["keep"]  # CAT term ~0 at init (B = 0), then live
    cast_flags = [m.comfy_cast_weights for m in mp.model.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
    assert not any(cast_flags)  # per-call weight casting switched off again


def test_compute_dtype_choice(comfy):
    P = pack_module(comfy, "cat_train.training.precision")
    assert P.compute_dtype("auto", "cpu", torch.bfloat16) == torch.bfloat16
    assert P.compute_dtype("auto", "cpu", torch.float16) == torch.float32
    assert P.compute_dtype("auto", "cuda", torch.float16, bf16_supported=True) == torch.bfloat16
    assert P.compute_dtype("auto", "cuda", torch.float16, bf16_supported=False) == torch.float16
    with pytest.raises(ValueError, match="fp16 compute needs a GPU"):
        P.compute_dtype("fp16", "cpu", torch.float16)
    with pytest.raises(ValueError, match="one of auto, bf16, fp16, fp32"):
        P.compute_dtype("fp8", "cpu", torch.float16)


def test_oom_in_first_forward_leaves_model_bit_identical(comfy, dataset_dir, monkeypatch):
    mp, clip, vae = tiny_model("sd15", seed=6, dtype=torch.bfloat16)
    ds = _dataset(comfy, dataset_dir, clip, vae)
    T = pack_module(comfy, "cat_train.training")
    before = _state(mp)
    unet = mp.model.diffusion_model
    real = type(unet).forward

    def oom_when(grad: bool):
        def forward(self, *a, **k):
            if torch.is_grad_enabled() == grad:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(self, *a, **k)
        return forward

    monkeypatch.setattr(type(unet), "forward", oom_when(grad=True))  # the first training forward
    with pytest.raises(T.TrainingOutOfMemory, match="out of memory at step 1.*gradient_checkpointing"):
        _train(comfy, mp, ds)
    assert _same(before, _state(mp))
    B = pack_module(comfy, "cat_train.training.budget")
    monkeypatch.setattr(type(unet), "forward", oom_when(grad=False))  # the budget's probe, before training
    with pytest.raises(B.DoesNotFit, match="out of memory in one no-grad forward.*lower the resolution"):
        _train(comfy, mp, ds)
    monkeypatch.setattr(type(unet), "forward", real)
    assert _same(before, _state(mp))
    assert not any(".base_layer." in k or "lora_" in k for k in unet.state_dict())


def test_model_sampling_node_upstream_sets_the_target(comfy, dataset_dir):
    """ModelSamplingDiscrete(v_prediction) on an eps checkpoint: the loss's target is v, not eps."""
    mp, clip, vae = tiny_model("sd15", seed=7)
    cm = pack_module(comfy, "nodes.comfy_model")
    objective = pack_module(comfy, "cat_train.step.objective").cat_objective
    (mp_v,) = comfy.nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(mp, "v_prediction", False)
    assert cm.ComfyDenoiser(mp).prediction_type == "eps" and cm.ComfyDenoiser(mp_v).prediction_type == "v"
    den = cm.ComfyDenoiser(mp_v)
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 800])
    ctx = {"context": torch.randn(2, 77, 64, generator=g)}
    with torch.no_grad():
        pred = den.predict(den.schedule.add_noise(x0, noise, t), t, ctx)
        fit = objective(den, contextlib.nullcontext, x0, noise, t, ctx, ctx, 0.0).fit  # no adapter: itself frozen
    abar = den.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(fit, (pred - v).pow(2).flatten(1).mean(1), rtol=1e-6, atol=0)
    assert ((pred - noise).pow(2).flatten(1).mean(1) - fit).abs().min() > 1e-3  # an eps target would differ

    (mp_z,) = comfy.nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(mp, "v_prediction", True)
    assert cm.ComfyDenoiser(mp_z).schedule.alphas_cumprod[-1] < 1e-7 < cm.ComfyDenoiser(mp).schedule.alphas_cumprod[-1]

    ds = _dataset(comfy, dataset_dir, clip, vae)
    res = _train(comfy, mp_v, ds, alpha=1.0, steps=3)[4]  # the CAT term on a v model, alpha > 0
    assert res.history[0]["keep"] < 1e-6 < res.history[-1]["keep"] and res.steps_done == 3

    (mp_x0,) = comfy.nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(mp, "x0", False)
    with pytest.raises(ValueError, match="not supported.*eps/v"):
        cm.check_supported(mp_x0)


def test_training_ignores_an_attention_backend_without_backward(comfy, dataset_dir, monkeypatch):
    """ComfyUI started with e.g. --use-sage-attention: the training passes use PyTorch SDPA instead."""
    import comfy.ldm.modules.attention as attn

    mp, clip, vae = tiny_model("sd15", seed=8)
    ds = _dataset(comfy, dataset_dir, clip, vae)
    calls = []

    @attn.wrap_attn
    def no_backward(q, k, v, heads, *a, **kw):
        calls.append(1)
        raise RuntimeError("this attention backend has no backward")

    monkeypatch.setattr(attn, "optimized_attention", no_backward)
    res = _train(comfy, mp, ds, steps=2)[4]
    assert res.steps_done == 2 and calls == []
    with pytest.raises(RuntimeError, match="no backward"):  # sampling still uses the user's choice
        with torch.no_grad():
            mp.model.diffusion_model(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), context=torch.randn(1, 77, 64))
    assert calls == [1]


def test_upstream_patches_apply_or_are_refused(comfy, dataset_dir):
    mp, clip, vae = tiny_model("sd15", seed=9)
    cm = pack_module(comfy, "nodes.comfy_model")
    seen = []

    def attn1_patch(q, k, v, extra_options):  # an attention patch (IPAdapter-style) must reach the training passes
        seen.append(extra_options["block"])
        return q, k, v

    patched = mp.clone()
    patched.set_model_attn1_patch(attn1_patch)
    den = cm.ComfyDenoiser(patched)
    with torch.no_grad():
        den.predict(torch.randn(1, 4, 8, 8), torch.tensor([10]), {"context": torch.randn(1, 77, 64)})
    assert len(seen) >= 2  # every transformer block of the tiny UNet

    wrapped = mp.clone()
    wrapped.set_model_unet_function_wrapper(lambda f, args: f(args["input"], args["timestep"], **args["c"]))
    with pytest.raises(ValueError, match="model_function_wrapper"):
        cm.check_supported(wrapped)


def test_unsupported_family_refused_before_loading(comfy):
    cm = pack_module(comfy, "nodes.comfy_model")
    mp = tiny_model("sd15", seed=10)[0]
    fake = mp.clone()
    fake.model = type("Flux", (), {"diffusion_model": torch.nn.Linear(2, 2), "model_sampling": mp.model.model_sampling})()
    with pytest.raises(ValueError, match="SD1.x and SD2.x.*Flux.*not supported"):
        cm.check_supported(fake)


def test_budget_before_step_one_and_auto_checkpointing(comfy, dataset_dir, monkeypatch, caplog):
    import logging

    import comfy.model_management as mm

    mp, clip, vae = tiny_model("sd15", seed=11, dtype=torch.bfloat16)
    ds = _dataset(comfy, dataset_dir, clip, vae)
    tr = pack_module(comfy, "nodes.trainer")
    A, L, T, B = (pack_module(comfy, f"cat_train.{m}") for m in ("adapters.lora", "training", "training", "training.budget"))
    spec, loss = A.LoraSpec(rank=4, alpha=4.0), L.CatLossConfig(1.0, "class", "dog")
    cm = pack_module(comfy, "nodes.comfy_model")
    with torch.inference_mode(False), cm.trainable(mp) as den:
        budget = tr.memory_budget(den, tr.model_examples(mp, ds, loss), spec, loss, T.TrainConfig(steps=1))
    n_lora = sum(4 * (m.in_features + m.out_features) for n, m in mp.model.diffusion_model.named_modules()
                 if n.endswith(spec.suffixes) and isinstance(m, torch.nn.Linear))
    assert budget.adapter == 16 * n_lora
    assert budget.weights == sum(p.numel() * 2 for p in mp.model.diffusion_model.parameters())  # bf16: 2 bytes
    assert 0 < budget.activations_checkpointed < budget.activations_plain

    # a device with room only for the checkpointed run: auto turns checkpointing on, and says so
    room = int((budget.need(True) + budget.need(False)) / 2 / B.HEADROOM)
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: room)
    with caplog.at_level(logging.INFO):
        res = tr.train_on_model(mp, ds, loss, spec, T.TrainConfig(steps=1, seed=1), checkpointing="auto")[4]
    assert res.steps_done == 1 and "gradient checkpointing on" in caplog.text and "memory budget on cpu" in caplog.text
    # a device too small even with checkpointing: stopped before step 1, the knobs named
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: budget.adapter // 2)
    with pytest.raises(B.DoesNotFit, match="does not fit.*lower the resolution.*rank"):
        tr.train_on_model(mp, ds, loss, spec, T.TrainConfig(steps=1, seed=1), checkpointing="auto")


def test_save_every_writes_loadable_lora_files(comfy, dataset_dir, tmp_path):
    mp, clip, vae = tiny_model("sdxl", seed=12)
    ds = _dataset(comfy, dataset_dir, clip, vae)
    tr = pack_module(comfy, "nodes.trainer")
    A, L, T = (pack_module(comfy, f"cat_train.{m}") for m in ("adapters.lora", "training", "training"))
    spec, loss = A.LoraSpec(rank=4, alpha=4.0), L.CatLossConfig(1.0, "class", "dog")
    cfg = T.TrainConfig(steps=4, lr=1e-2, seed=1, save_every=2, checkpoint_dir=str(tmp_path / "ck"))
    loras = tmp_path / "loras"
    res = tr.train_on_model(mp, ds, loss, spec, cfg, on_save=tr.step_lora_writer(mp, loras, "run", loss, spec, cfg, ds, "sdxl_base.safetensors"))[4]
    files = sorted(p.name for p in loras.iterdir())
    assert files == ["run_step000002.safetensors", "run_step000004.safetensors"]
    from safetensors.torch import load_file
    from safetensors import safe_open
    with safe_open(str(loras / files[1]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["cat_steps"] == "4"
    assert meta["ss_output_name"] == "run_step000004" and meta["ss_sd_model_name"] == "sdxl_base.safetensors"
    assert meta["ss_resolution"] == str(max(ds.buckets, key=lambda wh: wh[0] * wh[1]))
    import comfy.lora
    import comfy.utils
    sd = load_file(str(loras / files[1]))
    key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
    loaded = comfy.lora.load_lora(sd, key_map)
    assert len(loaded) == len(res.weights)  # every module of the step-4 LoRA resolves in the stock loader


def test_loss_config_node_class_words_and_preservation_list(comfy):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_LossConfig"]
    cfg = node.execute(1.0, "class", "sks=dog, zwx=cat", "", "a photo of a dog\n\na photo of a cat\n").result[0]
    assert cfg.class_word == {"sks": "dog", "zwx": "cat"}
    assert cfg.preservation_prompts == ("a photo of a dog", "a photo of a cat")
