"""CAT on flow-matching transformers inside a real ComfyUI: tiny SD3-shaped (MMDiT) and Flux-shaped models built
by ComfyUI's own classes, with their own tiny text encoders (SD3: CLIP-L/G; Flux: CLIP-L + T5) and a 16-channel VAE."""
from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import adapted_vs_stock_predictions, pack_module
from tiny_models import tiny_model

FAMILIES = ["sd3", "flux"]


@pytest.fixture(scope="module")
def flow_models(comfy):
    return {kind: tiny_model(kind, seed=11) for kind in FAMILIES}


def _mods(comfy):
    return [pack_module(comfy, m) for m in ("nodes.trainer", "nodes.comfy_model", "cat_train.adapters.lora",
                                            "cat_train.training", "cat_train.training")]


def _state(mp):
    return {k: (v.dtype, v.device, v.clone()) for k, v in mp.model.diffusion_model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and a[k][1] == b[k][1] and torch.equal(a[k][2], b[k][2]) for k in a)


@pytest.mark.parametrize("kind", FAMILIES)
def test_predict_is_the_velocity_comfyui_samples_with(comfy, flow_models, kind):
    """predict() == (x_t - apply_model(x_t, sigma)) / sigma: ComfyUI's CONST rule, x_t fed unchanged, the
    model's own timestep(sigma); the schedule's shift is the one the MODEL samples with."""
    mp, clip, _ = flow_models[kind]
    _, cm, _, _, _ = _mods(comfy)
    den = cm.ComfyDenoiser(mp)
    assert den.prediction_type == "flow" and den.family.name == kind
    ms = mp.model.model_sampling
    u = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    theirs_sigma = ms.sigma(u * 1000) if kind == "sd3" else ms.sigma(u)  # SD3: t/1000 shifted by 3; Flux: mu 1.15
    D = pack_module(comfy, "cat_train.step.denoiser")
    torch.testing.assert_close(D.time_shift(den.schedule.shift, u), theirs_sigma.double(), rtol=1e-6, atol=1e-7)
    assert den.schedule.shift == pytest.approx(3.0 if kind == "sd3" else math.exp(1.15))

    c = cm.comfy_cond(mp, clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog")), 64, 64)
    assert c["y"].shape[-1] == (64 if kind == "sd3" else 32)  # pooled CLIP-L+G / CLIP-L output is y
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([200.0, 700.0])
    x_t = den.schedule.add_noise(x0, noise, t)
    sigma = t / 1000
    ctx = {k: v.expand(2, *v.shape[1:]) for k, v in c.items()}
    kw = {"c_crossattn": ctx["context"], "y": ctx["y"]}
    if kind == "flux":
        kw["guidance"] = torch.full((2,), 1.0)  # what the trainer feeds Flux dev by default
    with torch.no_grad():
        ours = den.predict(x_t, t, ctx)
        denoised = mp.model.apply_model(x_t, sigma, **kw)
        theirs = (x_t - denoised) / sigma.view(-1, 1, 1, 1)
        if kind == "flux":
            other = den.predict(x_t, t, {**ctx, "guidance": torch.full((2,), 3.5)})
            assert (other - ours).abs().max() > 1e-4  # guidance reaches the network
    assert ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", FAMILIES)
def test_train_save_stock_load_roundtrip(comfy, flow_models, kind, dataset_dir, tmp_path):
    """CAT (alpha 1) trains; the input MODEL is bit-identical (dtype too); the saved LoRA loads through the stock
    LoraLoaderModelOnly, patches exactly the trained modules, and predicts what the trainer's adapted network does."""
    import comfy.lora as comfy_lora

    mp, clip, vae = flow_models[kind]
    tr, cm, A, L, T = _mods(comfy)
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    before = _state(mp)
    spec = A.LoraSpec(rank=4, alpha=4.0, preset="attn_ff")
    loss = L.CatLossConfig(1.0, "class", "dog")
    cfg = T.TrainConfig(steps=4, lr=1e-2, seed=1, checkpoint_dir=str(tmp_path / "ck"))
    patched, lora, _, summary, res = tr.train_on_model(mp, ds, loss, spec, cfg, "7")
    assert _same(before, _state(mp))
    assert res.steps_done == 4 and res.history[0]["keep"] < 1e-6 < res.history[-1]["keep"]  # CAT term ~0 at init, then live
    # the family preset: attention and MLPs of the blocks, nothing else
    want = {"sd3": (".attn.qkv", ".attn.proj", ".attn2.qkv", ".attn2.proj", ".mlp.fc1", ".mlp.fc2"),
            "flux": ("_attn.qkv", "_attn.proj", "_mlp.0", "_mlp.2", ".linear1", ".linear2")}[kind]
    assert res.weights and all(n.endswith(want) for n in res.weights)
    blocks = {"sd3": "joint_blocks.", "flux": ("double_blocks.", "single_blocks.")}[kind]
    assert all(n.startswith(blocks) for n in res.weights)
    if kind == "flux":
        assert any(n.startswith("single_blocks.") for n in res.weights) and any("txt_mlp" in n for n in res.weights)
    else:
        assert any("context_block" in n for n in res.weights) and any(".attn2." in n for n in res.weights)

    # every saved key is one ComfyUI's key map resolves, kohya-style lora_unet_<module path>
    key_map = comfy_lora.model_lora_keys_unet(mp.model, {})
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    for n in res.weights:
        assert key_map["lora_unet_" + n.replace(".", "_")] == f"diffusion_model.{n}.weight"
    assert stems == {"lora_unet_" + n.replace(".", "_") for n in res.weights}
    if kind == "flux":
        assert "lora_unet_double_blocks_0_img_attn_qkv" in stems  # the name kohya's sd-scripts writes
    path = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_SaveLora"].execute(lora, f"{kind}_flow_roundtrip").result[0]
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[kind]
    (loaded,) = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(mp, path.split("/loras/")[-1], 1.0)
    assert {k[len("diffusion_model."):-len(".weight")] for k in loaded.patches} == set(res.weights)
    assert set(patched.patches) == set(loaded.patches)

    ex = tr.model_examples(mp, ds, loss)[0]
    base, adapted, stock, restored = adapted_vs_stock_predictions(
        comfy, mp, cm.ComfyDenoiser(mp), ex, res.weights, spec, loaded, torch.tensor([600.0]))
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(stock, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(restored, base) and _same(before, _state(mp))


class _Latents:
    """The dataset interface the trainer reads, over fixed latents and seeded stand-in text encodings (the test of
    the loss needs no text encoder; the roundtrip test above runs the real CAT Dataset node)."""

    def __init__(self, kind, n=3):
        g = torch.Generator().manual_seed(4)
        self.items = [(torch.randn(16, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",), 1) for i in range(n)]
        self.ctx = (77, 4096, 64) if kind == "sd3" else (256, 32, 32)
        self.triggers, self.class_word, self.buckets = ("sks",), "dog", {(64, 64): n}

    def encode_text(self, prompts):
        L, C, P = self.ctx
        gens = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompts]
        return {"context": torch.stack([torch.randn(L, C, generator=g) for g in gens]),
                "pooled": torch.stack([torch.randn(P, generator=g) for g in gens])}


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_loss_falls_overfitting_three_latents(comfy, flow_models, kind, alpha):
    mp = flow_models[kind][0]
    tr, _, A, L, T = _mods(comfy)
    before = _state(mp)
    cfg = T.TrainConfig(steps=40, lr=1e-2, seed=2, batch_size=3)
    res = tr.train_on_model(mp, _Latents(kind), L.CatLossConfig(alpha, "class", "dog"),
                            A.LoraSpec(rank=8, alpha=8.0, preset="full"), cfg)[4]
    first = sum(h["fit"] for h in res.history[:8]) / 8
    last = sum(h["fit"] for h in res.history[-8:]) / 8
    print(f"{kind} alpha {alpha}: fit first 8 steps {first:.4f}, last 8 {last:.4f}")
    assert last < 0.85 * first, (first, last)
    assert res.history[0]["keep"] < 1e-6
    assert (res.history[-1]["keep"] > 0) == (alpha > 0)
    assert _same(before, _state(mp))


def test_flux_gradient_checkpointing_same_lora_blocks_unwrapped(comfy, flow_models, monkeypatch):
    mp = flow_models["flux"][0]
    tr, cm, A, L, T = _mods(comfy)
    net = mp.model.diffusion_model
    units = pack_module(comfy, "cat_train.families").of(net).checkpoint_units(net)
    assert len(units) == len(net.double_blocks) + len(net.single_blocks) == 3
    from torch.utils import checkpoint as ckpt_mod
    calls, real = [], ckpt_mod.checkpoint
    monkeypatch.setattr(ckpt_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = [tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0),
                             T.TrainConfig(steps=2, lr=1e-2, seed=1), checkpointing=c)[4] for c in ("off", "on")]
    assert len(calls) >= 3  # every block ran under checkpoint
    assert all("forward" not in vars(u) for u in units)
    for k, w in res[0].weights.items():
        torch.testing.assert_close(res[1].weights[k].up, w.up, atol=1e-6, rtol=1e-5)


def test_bf16_flux_trains_and_stays_as_loaded(comfy):
    mp = tiny_model("flux", seed=12, dtype=torch.bfloat16)[0]
    tr, _, A, L, T = _mods(comfy)
    before = _state(mp)
    assert {v[0] for v in before.values()} == {torch.bfloat16}
    res = tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0),
                            T.TrainConfig(steps=3, lr=1e-2, seed=1))[4]
    assert _same(before, _state(mp))
    assert all(w.up.dtype == torch.float32 for w in res.weights.values()) and max(w.up.abs().max().item() for w in res.weights.values()) > 0
    assert all(math.isfinite(h["loss"]) for h in res.history)


def test_video_model_refused_before_anything_is_loaded(comfy, monkeypatch):
    """A WAN 2.1 image-to-video model (tiny, built by ComfyUI): refused by name, nothing loaded, nothing cast (Wan
    text-to-video trains as single frames: tests/comfy/test_families_nextdit_wan.py)."""
    import comfy.model_management as mm
    import comfy.supported_models as sm
    from comfy import model_patcher

    class TinyWan(sm.WAN21_I2V):
        unet_config = {"image_model": "wan2.1", "model_type": "i2v"}
    cfg = TinyWan(dict(image_model="wan2.1", model_type="i2v", dim=32, ffn_dim=32, freq_dim=32, num_heads=2,
                       num_layers=1, text_dim=32, text_len=16, in_dim=36, out_dim=16))
    cfg.set_inference_dtype(torch.bfloat16, None)
    base = cfg.get_model({})
    mp = model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    tr, cm, A, L, T = _mods(comfy)
    dtypes = {n: p.dtype for n, p in base.diffusion_model.named_parameters()}
    with pytest.raises(ValueError, match=r"CAT trains SD1\.x.*SDXL.*SD3.*Flux.*WAN21 with a WanModel network, which is not supported"):
        tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0), A.LoraSpec(), T.TrainConfig(steps=1))
    assert loads == [] and {n: p.dtype for n, p in base.diffusion_model.named_parameters()} == dtypes


@pytest.mark.parametrize("variant, named", [("LongCatImage", "LongCat-Image")])
def test_flux_variants_refused_by_name_before_anything_is_loaded(comfy, flow_models, monkeypatch, variant, named):
    """ComfyUI v0.33's LongCat-Image model class subclasses its Flux class and runs the Flux network, so it passed the
    Flux check untrained and untested: refused in one line that names it, nothing loaded or cast. The refusal goes by
    class; v0.3.64 has no such class, so a subclass of Flux under that name stands in there. (Flux.2, built on the same
    classes, is a family of its own: tests/comfy/test_families_qwen_flux2.py.)"""
    import comfy.model_base as mb
    import comfy.model_management as mm
    from comfy import model_patcher

    cls = getattr(mb, variant, None) or type(variant, (mb.Flux,), {})
    base = cls(flow_models["flux"][0].model.model_config)  # the tiny Flux network inside the variant's model class
    mp = model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    tr, cm, A, L, T = _mods(comfy)
    with pytest.raises(ValueError, match=rf"this MODEL is {re.escape(named)} \(ComfyUI's {variant}\), which runs on Flux's "
                                         r"network but is not Flux\.1 and is not supported yet: train a Flux\.1 model\.$") as e:
        tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(), T.TrainConfig(steps=1))
    assert "\n" not in str(e.value) and loads == []
    assert cm.family_of(flow_models["flux"][0]) is pack_module(comfy, "cat_train.families").Flux  # Flux.1 still trains


def test_training_flag_set_for_the_trainers_passes_only(comfy, flow_models, tmp_path):
    """ComfyUI v0.33 runs Flux's rotary embedding through a comfy_kitchen kernel without a backward unless
    comfy.model_management.in_training is set: every training forward (Flux, checkpointed too) sees it set, and it is
    clear again after the trainer returns, raises or is cancelled. Where ComfyUI has no such flag (v0.3.64) it stays
    absent."""
    import comfy.model_management as mm

    from conftest import cancelled_after

    mp = flow_models["flux"][0]
    tr, _, A, L, T = _mods(comfy)
    has_flag = hasattr(mm, "in_training")
    idle = False if has_flag else None
    seen = []
    hook = mp.model.diffusion_model.double_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), getattr(mm, "in_training", None))))

    def disk_full(step, weights):
        raise OSError("disk full")
    try:
        assert getattr(mm, "in_training", None) is idle
        for ckpt in ("off", "on"):
            res = tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                                    T.TrainConfig(steps=2, lr=1e-2, seed=1), checkpointing=ckpt)[4]
            assert res.steps_done == 2 and getattr(mm, "in_training", None) is idle
        assert any(grad for grad, _ in seen) and {flag for _, flag in seen} == {True if has_flag else None}
        with pytest.raises(OSError, match="disk full"):
            tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                              T.TrainConfig(steps=3, lr=1e-2, save_every=1, checkpoint_dir=str(tmp_path / "err")), on_save=disk_full)
        assert getattr(mm, "in_training", None) is idle
        with cancelled_after(1, total=3):
            tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                              T.TrainConfig(steps=3, lr=1e-2, checkpoint_dir=str(tmp_path / "cancel")), "9")
        assert getattr(mm, "in_training", None) is idle
    finally:
        hook.remove()


def _cpu_dynamic_patcher_class():
    """ComfyUI's DynamicVRAM patcher (v0.33) as far as it can exist without a GPU, or None where ComfyUI has none: its
    per-device pinned host buffers need comfy_aimdo's GPU library and its constructor re-routes a CPU load device to
    the plain patcher, so both are skipped; everything else (is_dynamic, clone, load) is ComfyUI's own."""
    import comfy.model_patcher as MP

    dynamic = getattr(MP, "ModelPatcherDynamic", None)
    if dynamic is None:
        return None

    class CpuDynamic(dynamic):
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def register_load_device(self, device):
            pass

        def __del__(self):
            pass
    return CpuDynamic


def test_dynamic_vram_model_trains_on_a_non_dynamic_copy(comfy, monkeypatch, tmp_path):
    """ComfyUI v0.33 loads models with DynamicVRAM by default on GPUs: the weights stay in CPU memory and stream to the
    GPU per call, so a trainer taking its device from the first parameter would train on the CPU. The trainer trains
    a non-dynamic clone that the MODEL's own loader builds (cached_patcher_init, as ComfyUI's core loaders set it) and
    never loads the dynamic MODEL; that MODEL stays bit-identical and the returned MODEL is its clone with the LoRA.
    A dynamic MODEL whose loader cannot build one is refused before anything is loaded. Without DynamicVRAM
    (v0.3.64, and v0.33 with a plain patcher) the trainer trains the MODEL's own patcher."""
    import comfy.model_management as mm

    tr, _, A, L, T = _mods(comfy)
    loaded, real_load = [], mm.load_models_gpu

    def recording_load(models, *args, **kwargs):
        loaded.extend(m for m in models if hasattr(m.model, "diffusion_model"))  # networks, not a tiny CLIP being built
        return real_load(models, *args, **kwargs)
    monkeypatch.setattr(mm, "load_models_gpu", recording_load)

    def train(mp, name):
        return tr.train_on_model(mp, _Latents("flux"), L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                                 T.TrainConfig(steps=2, lr=1e-2, seed=1, checkpoint_dir=str(tmp_path / name)))

    plain = tiny_model("flux", seed=13)[0]
    train(plain, "plain")
    assert loaded and all(m is plain for m in loaded)

    dynamic_class = _cpu_dynamic_patcher_class()
    if dynamic_class is None:  # v0.3.64: no DynamicVRAM
        assert not hasattr(plain, "is_dynamic")
        return
    made = []

    def loader(seed, disable_dynamic=False):  # what load_checkpoint_guess_config does: the same file loaded again
        m = tiny_model("flux", seed=seed)[0]
        made.append((disable_dynamic, m))
        return (m,)
    src = tiny_model("flux", seed=13)[0]
    dyn = dynamic_class(src.model, src.load_device, src.offload_device)
    assert dyn.is_dynamic()
    before = _state(dyn)
    calls = []
    hook = dyn.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"^the MODEL input is loaded with ComfyUI's DynamicVRAM .* load the model with "
                                             r"a core loader .* or start ComfyUI with --disable-dynamic-vram\.$"):
            train(dyn, "refused")  # no cached_patcher_init: a custom loader's MODEL
        loaded.clear()
        dyn.cached_patcher_init = (loader, (13,), 0)
        patched, lora, _, _, res = train(dyn, "dynamic")
    finally:
        hook.remove()
    assert len(made) == 1 and made[0][0] is True  # one non-dynamic load, through the MODEL's loader
    trained = made[0][1].model
    assert loaded and all(not m.is_dynamic() and m.model is trained for m in loaded)
    assert calls == [] and _same(before, _state(dyn))  # the dynamic MODEL was never run nor changed
    assert patched.is_clone(dyn) and patched.is_dynamic()
    assert {k[len("diffusion_model."):-len(".weight")] for k in patched.patches} == set(res.weights) and res.steps_done == 2
    # the same training as on the plain patcher of the same weights: seeded alike, so the same LoRA
    again = train(tiny_model("flux", seed=13)[0], "again")[4]
    for k, w in res.weights.items():
        torch.testing.assert_close(again.weights[k].up, w.up, atol=1e-6, rtol=1e-5)


def test_family_presets_resolve_and_name_their_choices(comfy, flow_models):
    _, _, A, _, _ = _mods(comfy)
    flux, sd3 = flow_models["flux"][0].model.diffusion_model, flow_models["sd3"][0].model.diffusion_model
    F = pack_module(comfy, "cat_train.families")
    assert F.of(flux) is F.Flux and F.of(sd3) is F.SD3
    n_attn = len(A.target_modules(flux, A.LoraSpec(preset="attn")))
    assert n_attn == 4 * 1 + 2 * 2  # img/txt qkv+proj per double block, linear1+linear2 per single block
    assert A.target_modules(flux, A.LoraSpec(preset="attn")) == A.target_modules(flux, A.LoraSpec(preset="flux_attn"))
    full = A.target_modules(flux, A.LoraSpec(preset="full"))
    assert len(full) == n_attn + 4 + 2 + 2  # + double-block MLPs + img/txt modulation + single-block modulation
    # SD3: x and context blocks; the last context block is pre-only (qkv, no proj, no MLP)
    assert len(A.target_modules(sd3, A.LoraSpec(preset="sd3_attn"))) == 4 + 2 + 1 + 2  # block 0 (+attn2), block 1
    with pytest.raises(ValueError, match="no module of this flux model matches LoRA preset 'sd3_attn'.*flux_\\*"):
        A.target_modules(flux, A.LoraSpec(preset="sd3_attn"))
