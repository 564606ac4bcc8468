"""CAT on Lumina Image 2.0 and Z-Image (NextDiT) and on Wan 2.x text-to-video as single frames, inside a real ComfyUI:
tiny networks built by ComfyUI's own config and model classes (tiny_models.tiny_network), trained on fixed latents
with seeded stand-in caption encodings through the trainer the nodes run. NextDiT's encodings are as long as the
caption (as an LLM encoder's are: the trigger adds tokens); Wan's are padded to one length (umT5's tokenizer pads to
512). Wan's latents are one-frame clips (C, 1, H, W), as its VAE encodes an image.
On a ComfyUI without Z-Image's model class (v0.3.64) the Z-Image tests assert the pack's one-line refusal instead."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import adapted_vs_stock_predictions, cancelled_after, pack_module
from tiny_models import tiny_caption_encoder, tiny_network, tiny_vae16

KINDS = ["lumina2", "zimage", "wan", "hidream"]
NEXTDIT = ["lumina2", "zimage"]
TAG = {"lumina2": "lumina2", "zimage": "zimage", "wan": "wan_t2v", "hidream": "hidream"}
SHIFT = {"lumina2": 6.0, "zimage": 3.0, "wan": 8.0, "hidream": 3.0}
FAMILY = {"lumina2": "Lumina2", "zimage": "ZImage", "wan": "Wan", "hidream": "HiDream"}
UNITS = {"lumina2": 4, "zimage": 4, "wan": 2, "hidream": 2}
# what attn_ff adapts, and the top-level module lists its layers sit in
WANT = {"lumina2": ((".attention.qkv", ".attention.out", ".feed_forward.w1", ".feed_forward.w2", ".feed_forward.w3"),
                    {"noise_refiner", "context_refiner", "layers"}),
        "wan": (tuple(f".{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + (".ffn.0", ".ffn.2"), {"blocks"})}
WANT["zimage"] = WANT["lumina2"]
WANT["hidream"] = (tuple(f".attn1.to_{p}" for p in ("q", "k", "v", "out", "q_t", "k_t", "v_t", "out_t"))
                   + (".w1", ".w2", ".w3"), {"double_stream_blocks", "single_stream_blocks"})


def _has(kind) -> bool:
    import comfy.supported_models as sm

    return kind != "zimage" or hasattr(sm, "ZImage")


@pytest.fixture(scope="module")
def nets(comfy):
    return {k: tiny_network(k, seed=21) for k in KINDS if _has(k)}


def _net(comfy, nets, kind):
    """The tiny MODEL of `kind`, or (where this ComfyUI lacks its model class) the refusal asserted and None."""
    if _has(kind):
        return nets[kind]
    F, cm = pack_module(comfy, "cat_train.families"), pack_module(comfy, "nodes.comfy_model")
    with pytest.raises(ValueError) as e:
        cm.host_has(getattr(F, {"zimage": "ZImage"}[kind]))
    assert str(e.value) == ("Z-Image needs a ComfyUI with its ZImage model class (v0.33 has it, this ComfyUI does not): "
                            "update ComfyUI to train it.")
    with pytest.raises(AttributeError, match="ZImage"):
        tiny_network(kind)
    return None


def _mods(comfy):
    return [pack_module(comfy, m) for m in ("nodes.trainer", "nodes.comfy_model", "cat_train.adapters.lora",
                                            "cat_train.training")]


def _state(mp):
    return {k: (v.dtype, v.device, v.clone()) for k, v in mp.model.diffusion_model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and a[k][1] == b[k][1] and torch.equal(a[k][2], b[k][2])
                                        for k in a)


class _Captions:
    """The dataset interface the trainer reads: fixed latents and seeded stand-in encodings, one token per word plus a
    template's 4 (so y_T, holding the trigger, is longer than y: what an LLM encoder does)."""

    def __init__(self, kind="lumina2", n=3, width=32, frames=1):
        g = torch.Generator().manual_seed(4)
        shape = (16, frames, 8, 8) if kind == "wan" else (16, 8, 8)
        self.items = [(torch.randn(*shape, generator=g), f"a photo of sks dog {'big ' * i}", ("sks",), 1)
                      for i in range(n)]
        self.width, self.padded, self.hidream = width, kind in ("wan", "hidream"), kind == "hidream"
        self.triggers, self.class_word, self.buckets = ("sks",), "dog", {(64, 64): n}

    def _one(self, p):
        g = torch.Generator().manual_seed(sum(map(ord, p)))
        return torch.randn(16 if self.padded else 4 + len(p.split()), self.width, generator=g)

    def encode_text(self, prompts):
        """As the CAT Dataset node batches captions: shorter ones repeated whole to a common length."""
        import math

        rows = [self._one(p) for p in prompts]
        n = math.lcm(*{r.shape[0] for r in rows})
        out = {"context": torch.stack([r.repeat(n // r.shape[0], 1) for r in rows])}
        if self.hidream:  # CLIP-L+G pooled and 2 Llama layers' states, each of its caption (T5 and Llama padded)
            gens = [torch.Generator().manual_seed(7 + sum(map(ord, p))) for p in prompts]
            out["pooled"] = torch.stack([torch.randn(64, generator=g) for g in gens])
            out["encoder_hidden_states_llama3"] = torch.stack([torch.randn(2, 16, self.width, generator=g) for g in gens])
        return out


@pytest.mark.parametrize("kind", KINDS)
def test_family_holds_and_comfyui_agrees(comfy, nets, kind):
    import sys

    from conftest import ROOT

    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from family_checks import check_family

    F, A, E = (pack_module(comfy, f"cat_train.{m}") for m in ("families", "adapters.lora", "adapters.export"))
    cm = pack_module(comfy, "nodes.comfy_model")
    family = getattr(F, FAMILY[kind])
    assert cm.family_of(mp) is family and cm.base_model_version(mp) == TAG[kind]
    counts = check_family(F, A, E, family, mp.model.diffusion_model)
    # NextDiT: attention qkv/out + SwiGLU w1-3 in 1 noise refiner, 1 context refiner and 2 joint blocks, + the blocks'
    # 3 modulations (Lumina 2: + the final layer's); Wan: self/cross q k v o + 2 FFN in 2 blocks, + time_projection
    # HiDream: image q k v out (both blocks) + text ones (double) + SwiGLUs (text; shared and 4 routed experts) + the
    # blocks' and the final layer's modulation
    assert counts == {"lumina2": {"layers": 4 * 5 + 3 + 1, "units": 4}, "zimage": {"layers": 4 * 5 + 3, "units": 4},
                      "wan": {"layers": 2 * 10 + 1, "units": 2}, "hidream": {"layers": 8 + 4 + 3 * 11 + 3, "units": 2}}[kind]
    # the stock loader's key map resolves every kohya name, and a header says the family
    import comfy.lora as comfy_lora

    key_map = comfy_lora.model_lora_keys_unet(mp.model, {})
    names = family.kohya_names(mp.model.diffusion_model)
    full = A.target_modules(mp.model.diffusion_model, A.LoraSpec(preset="full"))
    assert all(key_map["lora_unet_" + names[n].replace(".", "_")] == f"diffusion_model.{n}.weight" for n in full)
    H = pack_module(comfy, "cat_train.families.headers")
    keys = [f"lora_unet_{names[n].replace('.', '_')}.lora_down.weight" for n in full]
    assert H.lora_family({k: {} for k in keys}) == kind
    assert H.lora_family({"__metadata__": {"ss_base_model_version": TAG[kind]}}) == kind
    sd = {k.removeprefix("diffusion_model."): {} for k in mp.model.state_dict() if k.startswith("diffusion_model.")}
    assert H.model_family(sd) == kind


@pytest.mark.parametrize("kind", NEXTDIT)
def test_predict_is_comfyuis_velocity_and_prompts_stay_whole(comfy, nets, kind):
    """predict() == ComfyUI's own conditioning path (Lumina2.extra_conds from the text encoder's output and its
    attention mask) through apply_model, CONST rule; a batch whose shorter caption was repeated to a common length
    predicts each row as it does alone (ComfyUI never batches captions of different lengths for these models)."""
    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    _, cm, _, _ = _mods(comfy)
    den = cm.ComfyDenoiser(mp)
    assert den.prediction_type == "flow" and den.schedule.shift == pytest.approx(SHIFT[kind])
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 9, 32, generator=g)
    conditioning = [[ctx, {"attention_mask": torch.ones(1, 9, dtype=torch.long)}]]
    c = cm.comfy_cond(mp, conditioning, 64, 64)
    assert set(c) == {"context", "tokens"} and c["tokens"].tolist() == [[9.0]]
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([200.0, 700.0])
    x_t = den.schedule.add_noise(x0, noise, t)
    sigma = den.schedule.sigma(t).float()
    theirs_kw = {k: v.cond for k, v in mp.model.extra_conds(cross_attn=ctx.expand(2, -1, -1), device=x_t.device,
                                                             noise=x_t, attention_mask=conditioning[0][1]["attention_mask"]
                                                             ).items()}
    assert theirs_kw["num_tokens"] == 9
    with torch.no_grad():
        ours = den.predict(x_t, t, {k: v.expand(2, *v.shape[1:]) for k, v in c.items()})
        theirs = (x_t - mp.model.apply_model(x_t, sigma, **theirs_kw)) / sigma.view(-1, 1, 1, 1)
        assert ours.abs().mean() > 1e-3
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        # rows of 9 and 3 tokens: the 3 repeated to 9 in the batch, predicted on its own 3
        short = torch.randn(1, 3, 32, generator=g)
        batch = {"context": torch.cat([ctx, short.repeat(1, 3, 1)]), "tokens": torch.tensor([[9.0], [3.0]])}
        both = den.predict(x_t, t, batch)
        alone = den.predict(x_t[1:], t[1:], {"context": short, "tokens": torch.tensor([[3.0]])})
        repeated = den.predict(x_t[1:], t[1:], {"context": short.repeat(1, 3, 1)})
    torch.testing.assert_close(both[:1], ours[:1], atol=1e-5, rtol=1e-4)  # batch of 1 vs 2: float rounding
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-4)
    assert (repeated - alone).abs().max() > 1e-4  # what a repeated caption would have done to this network


@pytest.mark.parametrize("kind", KINDS)
def test_cat_trains_model_untouched_stock_loader_predicts_as_trained(comfy, nets, kind, tmp_path):
    """CAT (alpha 1): the CAT term is 0 at init (y gets the same tokens in the frozen and the adapted pass although
    y_T, longer, shares the adapted batch), the fit loss falls, the input MODEL is bit-identical (dtype, device), and
    the saved LoRA loads through the stock LoraLoaderModelOnly, patches exactly the trained modules and predicts what
    the trainer's adapted network does."""
    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    tr, cm, A, T = _mods(comfy)
    before = _state(mp)
    ds = _Captions(kind)
    spec = A.LoraSpec(rank=8, alpha=8.0, preset="attn_ff")
    loss = T.CatLossConfig(1.0, "class", "dog")
    cfg = T.TrainConfig(steps=40, lr=2e-2, seed=1, batch_size=3, checkpoint_dir=str(tmp_path / "ck"))
    patched, lora, _, _, res = tr.train_on_model(mp, ds, loss, spec, cfg, "7")
    assert _same(before, _state(mp))
    assert res.steps_done == 40 and res.history[0]["keep"] < 1e-6 < res.history[-1]["keep"]
    first = sum(h["fit"] for h in res.history[:8]) / 8
    last = sum(h["fit"] for h in res.history[-8:]) / 8
    print(f"{kind}: fit first 8 steps {first:.4f}, last 8 {last:.4f}; keep at step 40 {res.history[-1]['keep']:.2e}")
    assert last < 0.95 * first, (first, last)  # per-step fit at random sigma: noisy, and the flow target is ε − x0
    assert res.weights and all(n.endswith(WANT[kind][0]) for n in res.weights)
    assert {n.split(".")[0] for n in res.weights} == WANT[kind][1]

    path = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_SaveLora"].execute(lora, f"{kind}_roundtrip").result[0]
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == TAG[kind]
    (loaded,) = comfy.nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(
        mp, path.split("/loras/")[-1], 1.0)
    assert {k[len("diffusion_model."):-len(".weight")] for k in loaded.patches} == set(res.weights)
    assert set(patched.patches) == set(loaded.patches)
    ex = tr.model_examples(mp, ds, loss)[0]
    base, adapted, stock, restored = adapted_vs_stock_predictions(
        comfy, mp, cm.ComfyDenoiser(mp), ex, res.weights, spec, loaded, torch.tensor([600.0]))
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(stock, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(restored, base) and _same(before, _state(mp))


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_resume_and_checkpointing(comfy, nets, kind, tmp_path, monkeypatch):
    """Cancel after step 2 keeps its checkpoint and the MODEL untouched; resuming finishes the run with the LoRA an
    uninterrupted run trains; gradient checkpointing (every refiner and joint block) trains the same LoRA."""
    import comfy.model_management as mm

    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    tr, _, A, T = _mods(comfy)
    before = _state(mp)

    def run(name, **kw):
        cfg = T.TrainConfig(steps=4, lr=1e-2, seed=3, checkpoint_dir=str(tmp_path / name))
        return tr.train_on_model(mp, _Captions(kind), T.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                                 cfg, "5", **kw)[4]
    with cancelled_after(2, total=4) as seen:
        run("cut")
    assert seen == [1, 2] and _same(before, _state(mp))
    ck = T.latest_checkpoint(tmp_path / "cut")
    assert ck is not None and ck.name == "cat-step000002.pt"
    resumed = run("cut", resume=str(ck))
    assert resumed.steps_done == 4 and [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    whole = run("whole")
    net = mp.model.diffusion_model
    units = pack_module(comfy, "cat_train.families").of(net).checkpoint_units(net)
    from torch.utils import checkpoint as ckpt_mod
    calls, real = [], ckpt_mod.checkpoint
    monkeypatch.setattr(ckpt_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ckpt = run("ckpt", checkpointing="on")
    assert len(calls) >= len(units) == UNITS[kind] and all("forward" not in vars(u) for u in units)
    for k, w in whole.weights.items():
        torch.testing.assert_close(resumed.weights[k].up, w.up, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ckpt.weights[k].up, w.up, atol=1e-6, rtol=1e-5)
    assert _same(before, _state(mp)) and not mm.processing_interrupted()


@pytest.mark.parametrize("kind", NEXTDIT)
def test_other_nextdit_models_refused_by_name(comfy, nets, kind, monkeypatch):
    """Lumina-based models the trainer was not written for (NewBie's pooled CLIP input, Z-Image Omni's SigLIP input)
    are refused before anything is loaded."""
    import comfy.model_management as mm

    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    tr, cm, A, T = _mods(comfy)
    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    net = mp.model.diffusion_model
    net.siglip_embedder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    try:
        with pytest.raises(ValueError, match=r"this MODEL is a Lumina2 with a NextDiT network, which is not supported"):
            tr.train_on_model(mp, _Captions(kind), T.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(),
                              T.TrainConfig(steps=1))
    finally:
        net.siglip_embedder = None
    assert loads == [] and re.search("Lumina Image 2.0 and Z-Image", cm.SUPPORTED)


def test_wan_predict_is_comfyuis_velocity_of_one_frame(comfy, nets):
    """predict() on (B, C, H, W) == ComfyUI's own conditioning path (WAN21.extra_conds) through apply_model on the
    one-frame clip (B, C, 1, H, W), CONST rule, timestep 1000 sigma with Wan's shift 8."""
    mp = nets["wan"]
    _, cm, _, _ = _mods(comfy)
    den = cm.ComfyDenoiser(mp)
    assert den.prediction_type == "flow" and den.schedule.shift == pytest.approx(8.0)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 16, 32, generator=g)
    c = cm.comfy_cond(mp, [[ctx, {}]], 64, 64)
    assert set(c) == {"context"}  # cross-attention only: a caption repeated to a common length changes nothing
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([200.0, 700.0])
    x_t = den.schedule.add_noise(x0, noise, t)
    sigma = den.schedule.sigma(t).float()
    clip = x_t[:, :, None]
    kw = {k: v.cond for k, v in mp.model.extra_conds(cross_attn=ctx.expand(2, -1, -1), device=x_t.device, noise=clip
                                                     ).items() if hasattr(v, "cond")}
    with torch.no_grad():
        ours = den.predict(x_t, t, {"context": ctx.expand(2, -1, -1)})
        theirs = (clip - mp.model.apply_model(clip, sigma, **kw)) / sigma.view(-1, 1, 1, 1, 1)
        again = den.predict(x_t, t, {"context": ctx.repeat(1, 3, 1).expand(2, -1, -1)})
    assert ours.shape == x_t.shape and ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, theirs[:, :, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-4)


def test_wan_clips_and_other_wan_models_refused(comfy, nets, monkeypatch):
    """A dataset of several-frame clips is refused by shape; Wan image-to-video (WAN21_I2V: image channels and
    CLIP-vision input) and Wan 2.2 5B (WAN22: per-frame timesteps) MODELs are refused by name before anything is
    loaded or cast."""
    import comfy.model_management as mm
    import comfy.supported_models as sm
    from comfy import model_patcher

    tr, cm, A, T = _mods(comfy)
    with pytest.raises(ValueError, match=r"^a dataset latent of shape \(16, 2, 8, 8\) for a Wan 2\.x \(single frame\) "
                                         r"model: CAT trains it on images \(one-frame clips\); multi-frame clips are not "
                                         r"supported\.$"):
        tr.train_on_model(nets["wan"], _Captions("wan", frames=2), T.CatLossConfig(1.0, "class", "dog"),
                          A.LoraSpec(rank=2, alpha=2.0), T.TrainConfig(steps=1))
    from tiny_models import TINY_WAN_DIT

    class TinyI2V(sm.WAN21_I2V):
        unet_config = {"image_model": "wan2.1", "model_type": "i2v"}

    class TinyTI2V(sm.WAN22_T2V):
        unet_config = {"image_model": "wan2.1", "model_type": "t2v"}
    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: loads.append(a))
    for cfg, named in ((TinyI2V(dict(TINY_WAN_DIT, model_type="i2v", in_dim=36)), "WAN21"),
                       (TinyTI2V(dict(TINY_WAN_DIT, in_dim=48, out_dim=48)), "WAN22")):
        cfg.set_inference_dtype(torch.bfloat16, None)
        base = cfg.get_model({})
        mp = model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
        dtypes = {n: p.dtype for n, p in base.diffusion_model.named_parameters()}
        with pytest.raises(ValueError, match=rf"this MODEL is a {named} with a WanModel network, which is not supported"):
            tr.train_on_model(mp, _Captions("wan"), T.CatLossConfig(1.0), A.LoraSpec(), T.TrainConfig(steps=1))
        assert {n: p.dtype for n, p in base.diffusion_model.named_parameters()} == dtypes
    assert loads == []


def test_hidream_dataset_keeps_every_encoders_output_per_caption(comfy, nets):
    """HiDream's CONDITIONING carries Llama 3.1 states beside T5 and the pooled CLIP-L+G: the CAT Dataset keeps all
    three per caption, so y's example holds y's (not y_T's) T5, pooled and Llama states, as ComfyUI encodes y."""
    from dataclasses import replace

    mp = nets["hidream"]
    tr, _, _, T = _mods(comfy)
    D = pack_module(comfy, "nodes.dataset")

    class Encoders:  # what ComfyUI's HiDream CLIP returns for a text, seeded by it
        def tokenize(self, text):
            return text

        def encode_from_tokens_scheduled(self, text):
            g = torch.Generator().manual_seed(sum(map(ord, text)))
            return [[torch.randn(1, 16, 32, generator=g), {"pooled_output": torch.randn(1, 64, generator=g),
                                                           "conditioning_llama3": torch.randn(1, 2, 16, 32, generator=g)}]]
    items = _Captions("hidream").items
    ds = D.CatDataset(items=items, triggers=("sks",), class_word="dog", clip=Encoders(), source="")
    loss = T.CatLossConfig(1.0, "class", "dog")
    ex = tr.model_examples(mp, replace(ds), loss)[1]
    y = pack_module(comfy, "cat_train.data.prompts").preservation_prompt(items[1][1], ("sks",), loss.preservation, "dog")
    for cond, text in ((ex.cond_token, items[1][1]), (ex.cond_pres, y)):
        ctx, extras = Encoders().encode_from_tokens_scheduled(text)[0]
        torch.testing.assert_close(cond["context"], ctx[0])
        torch.testing.assert_close(cond["y"], extras["pooled_output"][0])
        torch.testing.assert_close(cond["encoder_hidden_states_llama3"], extras["conditioning_llama3"][0])

    class LongCaption(Encoders):  # a caption past the 128 Llama tokens HiDream's tokenizer pads to
        def encode_from_tokens_scheduled(self, text):
            out = super().encode_from_tokens_scheduled(text)
            if "big big" in text:
                out[0][1]["conditioning_llama3"] = out[0][1]["conditioning_llama3"].repeat(1, 1, 2, 1)
            return out
    long = D.CatDataset(items=items, triggers=("sks",), class_word="dog", clip=LongCaption(), source="")
    with pytest.raises(ValueError, match=r"^the captions' encoder_hidden_states_llama3 have different lengths \[16, 32\]: "
                                         r"a caption is longer than its text encoder pads to \(HiDream: 128 Llama tokens"):
        tr.model_examples(mp, long, loss)


def test_hidream_predict_is_comfyuis_velocity_with_all_its_encoders(comfy, nets):
    """HiDream's CONDITIONING (T5 context, CLIP-L+G pooled, Llama 3.1 states of every layer) goes through comfy_cond to
    the same network call as ComfyUI's own path (HiDream.extra_conds, encode_adm) through apply_model; each of the
    three reaches the network."""
    mp = nets["hidream"]
    _, cm, _, _ = _mods(comfy)
    den = cm.ComfyDenoiser(mp)
    assert den.prediction_type == "flow" and den.schedule.shift == pytest.approx(3.0)
    g = torch.Generator().manual_seed(0)
    ctx, pooled, llama = torch.randn(1, 16, 32, generator=g), torch.randn(1, 64, generator=g), torch.randn(1, 2, 16, 32, generator=g)
    c = cm.comfy_cond(mp, [[ctx, {"pooled_output": pooled, "conditioning_llama3": llama}]], 64, 64)
    assert set(c) == {"context", "y", "encoder_hidden_states_llama3"}
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([200.0, 700.0])
    x_t = den.schedule.add_noise(x0, noise, t)
    sigma = den.schedule.sigma(t).float()
    two = lambda v: v.expand(2, *v.shape[1:])
    kw = {k: v.cond for k, v in mp.model.extra_conds(cross_attn=two(ctx), pooled_output=two(pooled),
                                                     conditioning_llama3=two(llama), device=x_t.device, noise=x_t).items()}
    with torch.no_grad():
        ours = den.predict(x_t, t, {k: two(v) for k, v in c.items()})
        theirs = (x_t - mp.model.apply_model(x_t, sigma, **kw)) / sigma.view(-1, 1, 1, 1)
        for k in c:
            other = den.predict(x_t, t, {**{k2: two(v) for k2, v in c.items()}, k: two(c[k]) + 1.0})
            assert (other - ours).abs().max() > 1e-4, k  # each encoder's part reaches the network
    assert ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", NEXTDIT)
def test_dataset_node_encodes_y_through_the_familys_own_encoder(comfy, nets, kind, dataset_dir):
    """The CAT Dataset node with the family's own caption-encoder class (tiny_caption_encoder) and a 16-channel VAE:
    y_T and y (the caption without the trigger) are exactly what ComfyUI's CLIP encodes for them, each with its own
    length, and CAT trains from them with the CAT term 0 at init and the MODEL untouched."""
    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    tr, cm, A, T = _mods(comfy)
    clip = tiny_caption_encoder(kind)
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, tiny_vae16(), clip, ("sks",), "dog", ".txt", 128,
                                                           True)
    loss = T.CatLossConfig(1.0, "class", "dog")
    P = pack_module(comfy, "cat_train.data.prompts")
    own = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))[0]
    examples = tr.model_examples(mp, ds, loss)
    for (_, caption, trig, _), ex in zip(ds.items, examples):  # each image's own example first, in the items' order
        y = P.preservation_prompt(caption, trig, loss.preservation, loss.class_word)
        assert "sks" in caption and "sks" not in y and "dog" in y
        for cond, text in ((ex.cond_token, caption), (ex.cond_pres, y)):
            ctx, extras = own(text)
            assert extras["attention_mask"].all()  # one caption: no padding, so ComfyUI passes no mask, only its length
            torch.testing.assert_close(cond["context"], ctx[0].float())
            assert cond["tokens"].tolist() == [float(ctx.shape[1])]
    ex = examples[-1]
    assert ex.cond_token["context"].shape[0] > ex.cond_pres["context"].shape[0]  # the trigger's tokens
    before = _state(mp)
    res = tr.train_on_model(mp, ds, loss, A.LoraSpec(rank=2, alpha=2.0), T.TrainConfig(steps=3, lr=1e-2, seed=1,
                                                                                       batch_size=2))[4]
    assert res.history[0]["keep"] < 1e-6 < res.history[-1]["keep"] and _same(before, _state(mp))


@pytest.mark.parametrize("kind", KINDS)
def test_memory_budget_probes_the_network(comfy, nets, kind):
    """The budget the trainer prints before step 1 probes these networks (Wan's one-frame clip, HiDream's four
    encoders, NextDiT's caption lengths): weights as stored, a LoRA, activations with and without checkpointing (which
    saves nothing on networks this small: its gain at real size is benchmarks/memory.py's, docs/families.md)."""
    mp = _net(comfy, nets, kind)
    if mp is None:
        return
    tr, cm, A, T = _mods(comfy)
    ds, loss, spec = _Captions(kind), T.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=4, alpha=4.0)
    with cm.trainable(mp) as den:
        b = tr.memory_budget(den, tr.model_examples(mp, ds, loss), spec, loss, T.TrainConfig(steps=1))
    net = mp.model.diffusion_model
    assert b.weights == sum(p.numel() * p.element_size() for p in net.parameters())
    x = tr.model_examples(mp, ds, loss)[0].latent
    assert b.adapter > 0 and min(b.activations_checkpointed, b.activations_plain) > 2 * 4 * x.numel(), b


@pytest.mark.parametrize("kind", ["lumina2", "wan"])
def test_previews_sample_with_a_negative_prompt_of_another_length(comfy, nets, kind):
    """The trainer's preview sampler (CFG: prompt and negative prompt in one batch) on these networks: a negative of
    another token length is batched as the trainer batches captions (the sampler's plain concatenation refused two
    lengths); on NextDiT each half then runs on its own tokens (test_predict_is_comfyuis_velocity_...)."""
    S = pack_module(comfy, "cat_train.measure.sampling")
    _, cm, _, _ = _mods(comfy)
    mp = nets[kind]
    den = cm.ComfyDenoiser(mp)
    g = torch.Generator().manual_seed(1)
    ctx, neg = torch.randn(1, 9, 32, generator=g), torch.randn(1, 3 if kind == "lumina2" else 9, 32, generator=g)
    cond, uncond = cm.comfy_cond(mp, [[ctx, {}]], 64, 64), cm.comfy_cond(mp, [[neg, {}]], 64, 64)
    noise = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        z = S.sample(den, cond, uncond, (1, 16, 8, 8), steps=3, cfg=3.0, noise=noise)
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all() and (z - noise).abs().max() > 1e-3
