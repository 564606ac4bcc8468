"""CatVersion core: K/V concatenation in the text encoder's self-attention, training, files."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cancel import Cancelled, cancel_at
from cat_train.adapters import catversion as cv
from cat_train.adapters.catversion.attention import _sdpa
from cat_train.terms.flip import Flip
from cat_train.training import catversion as cvt
from cat_train.training.integrity import changed, module_fingerprint
from cat_train.world import model as wm
from cat_train.world.text import WorldTextEncoder, token_ids

PROMPTS = ["a sks circle on a grey background", "a circle on a grey background", "a red square on a black background"]


@pytest.fixture(scope="module")
def base():
    return wm.load_base()


def _encode(text, prompts=PROMPTS):
    with torch.no_grad():
        return text.encode(prompts)["context"]


def test_paper_defaults():
    spec = cv.CatVersionSpec()
    assert (spec.layers, spec.length, spec.init, spec.init_std) == (3, 1, "normal", 1.0)
    cfg = cvt.CatVersionConfig()
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.alpha) == (1000, 1e-2, 2, 0.0)
    assert cv.resolve_layers(12, 3) == (9, 10, 11)          # the released adapters' layers of CLIP ViT-L/14
    assert cv.resolve_layers(12, 3, output_layer=-2) == (8, 9, 10)  # clip skip 2 / SDXL: layers that reach the output
    assert cv.resolve_layers(12, (0, -1)) == (0, 11)
    with pytest.raises(ValueError, match="only 2 self-attention layers reach the output"):
        cv.resolve_layers(2, 3)
    with pytest.raises(ValueError, match="outside"):
        cv.resolve_layers(12, (12,))


def test_exact_noop_when_removed_or_switched_off(base):
    _, text = base
    before = _encode(text)
    fp = module_fingerprint(text)
    emb = cv.new_embeddings(text, cv.CatVersionSpec(layers=2), generator=torch.Generator().manual_seed(0))
    with cv.installed(text, emb) as sw:
        on = _encode(text)
        with cv.disabled(sw):
            off = _encode(text)
    after = _encode(text)
    assert (on - before).abs().max() > 1e-2          # the embeddings do change every prompt's features
    assert torch.equal(off, before) and torch.equal(after, before)  # switched off / removed: bit for bit
    assert not changed(fp, module_fingerprint(text))
    for _, m in cv.find_self_attention(text):
        assert "forward" not in m.__dict__ and not m._forward_pre_hooks


def test_length_one_equals_torch_bias_kv():
    """torch's add_bias_kv appends one learned key/value after projection: the same operation, written independently."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(64, 4, add_bias_kv=True, batch_first=True).eval()
    ours = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k not in ("bias_k", "bias_v")})
    with torch.no_grad():
        ref.bias_k.normal_()
        ref.bias_v.normal_()
    emb = cv.KVEmbeddings((0,), 1, 64, 4, 1)
    with torch.no_grad():
        emb.keys[0, 0].copy_(ref.bias_k[0, 0])
        emb.values[0, 0].copy_(ref.bias_v[0, 0])
    x = torch.randn(3, 7, 64)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    wrapper = nn.Sequential(ours)  # installed() looks the layer up inside a container
    with torch.no_grad(), cv.installed(wrapper, emb):
        for kw in ({}, {"attn_mask": causal}, {"key_padding_mask": pad},
                   {"attn_mask": causal, "key_padding_mask": pad}):
            a = ours(x, x, x, need_weights=False, **kw)[0]
            b = ref(x, x, x, need_weights=False, **kw)[0]
            assert (a - b).abs().max() < 1e-5, kw
    plain = ours(x, x, x, need_weights=False)[0]
    assert (plain - ref(x, x, x, need_weights=False)[0]).abs().max() > 1e-3


class ProjAttention(nn.Module):
    """ComfyUI's CLIPAttention shape: q/k/v/out projections, called as (x, mask, optimized_attention)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask=None, optimized_attention=None):
        return self.out_proj(optimized_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


def _manual(m, x, pk, pv, mask):
    b, n, e = x.shape
    h, d = m.heads, e // m.heads
    q = m.q_proj(x).view(b, n, h, d).transpose(1, 2)
    k = torch.cat([pk.expand(b, -1, -1), m.k_proj(x)], 1).view(b, -1, h, d).transpose(1, 2)
    v = torch.cat([pv.expand(b, -1, -1), m.v_proj(x)], 1).view(b, -1, h, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / d**0.5
    logits[..., pk.shape[0]:] += mask  # the prefix columns are visible to every token
    out = logits.softmax(-1) @ v
    return m.out_proj(out.transpose(1, 2).reshape(b, n, e))


def test_proj_attention_against_the_formula():
    torch.manual_seed(1)
    m = ProjAttention()
    x = torch.randn(2, 5, 32)
    mask = torch.full((5, 5), -torch.finfo(torch.float32).max).triu(1)
    emb = cv.KVEmbeddings((0,), 3, 32, 4, 1).initialise(cv.CatVersionSpec(length=3), torch.Generator().manual_seed(0))

    def attn(q, k, v, heads, mask):
        return _sdpa(q, k, v, heads, mask)
    with torch.no_grad(), cv.installed(nn.Sequential(m), emb):
        got = m(x, mask, attn)
    want = _manual(m, x, emb.keys[0], emb.values[0], mask)
    assert (got - want).abs().max() < 1e-5


def _items():
    import numpy as np
    from cat_train.world import generator as wg
    scenes = wg.identity_scenes()
    imgs = torch.from_numpy(wg.to_tensor_array(np.stack([wg.draw(s) for s in scenes])))
    return [(wm.encode(im[None])[0], f"a {wg.TRIGGER} circle on a {s.background} background", (wg.TRIGGER,))
            for im, s in zip(imgs, scenes)]


def test_training_moves_only_the_embeddings_and_is_seeded(base):
    den, text = base
    fp_unet, fp_text = module_fingerprint(den.module), module_fingerprint(text)
    spec = cv.CatVersionSpec(layers=2)
    cfg = cvt.CatVersionConfig(steps=12, lr=1e-2, batch_size=2, class_word="circle", seed=3)
    init = cv.new_embeddings(text, spec, generator=torch.Generator().manual_seed(3))
    r1 = cvt.train_catversion(den, {"text": text}, text.encode, _items(), spec, cfg)
    r2 = cvt.train_catversion(den, {"text": text}, text.encode, _items(), spec, cfg)
    e1, e2 = r1.embeddings["text"], r2.embeddings["text"]
    assert e1.layer_indices == (0, 1) and e1.keys.shape == (2, 1, 64)
    assert torch.equal(e1.keys, e2.keys) and torch.equal(e1.values, e2.values)  # same seed, same embeddings
    assert (e1.keys - init.keys).abs().max() > 1e-3 and (e1.values - init.values).abs().max() > 1e-3
    assert not changed(fp_unet, module_fingerprint(den.module)) and not changed(fp_text, module_fingerprint(text))
    assert all(not p.requires_grad for p in (*den.module.parameters(), *text.parameters()))
    assert len(r1.history) == 12 and all(h["keep"] == 0 for h in r1.history)
    assert _encode(text).requires_grad is False and "forward" not in cv.find_self_attention(text)[0][1].__dict__


def test_cat_term_compares_with_the_encoder_without_embeddings(base):
    den, text = base
    spec = cv.CatVersionSpec(layers=1)
    r = cvt.train_catversion(den, {"text": text}, text.encode, _items(), spec,
                             cvt.CatVersionConfig(steps=3, alpha=1.0, class_word="circle", seed=0))
    # step 1's keep term: the frozen pass (no embeddings) against the adapted pass on y, before any update
    emb = cv.new_embeddings(text, spec, generator=torch.Generator().manual_seed(0))
    assert r.history[0]["keep"] > 0 and all(h["loss"] >= h["fit"] for h in r.history)
    with torch.no_grad():
        plain = text.encode(["a circle on a grey background"])["context"]
        with cv.installed(text, emb):
            with_emb = text.encode(["a circle on a grey background"])["context"]
    # y's conditioning differs with and without: the term is not trivially 0
    assert (with_emb - plain).abs().max() > 1e-2


def test_file_round_trip_and_metadata(base, tmp_path):
    _, text = base
    emb = cv.new_embeddings(text, cv.CatVersionSpec(layers=(1,), length=2), generator=torch.Generator().manual_seed(5))
    meta = cvt.training_metadata(cv.CatVersionSpec(layers=(1,), length=2), cvt.CatVersionConfig(steps=7), ["sks"])
    path = cv.save_catversion(tmp_path / "c.safetensors", {"text": emb}, meta)
    loaded, m = cv.load_catversion(path, expect={"text": cv.encoder_info(text)})
    e = loaded["text"]
    assert torch.equal(e.keys, emb.keys) and torch.equal(e.values, emb.values) and e.layer_indices == (1,)
    assert json.loads(m["catversion_encoders"])["text"] == {"hidden": 64, "heads": 4, "layers": 2, "indices": [1],
                                                            "length": 2,
                                                        "prefix_bias": 0.0}
    assert m["catversion_steps"] == "7" and json.loads(m["catversion_triggers"]) == ["sks"]
    with torch.no_grad():
        with cv.installed(text, emb):
            a = _encode(text)
        with cv.installed(text, e):
            b = _encode(text)
    assert torch.equal(a, b)


def test_bad_files_name_the_mismatch(base, tmp_path):
    _, text = base
    expect = {"text": cv.encoder_info(text)}
    wide = cv.KVEmbeddings((0,), 1, 32, 4, 2)
    p = cv.save_catversion(tmp_path / "wide.safetensors", {"text": wide})
    with pytest.raises(ValueError, match=r"wide\.safetensors.*hidden size 32, but this one has 64"):
        cv.load_catversion(p, expect=expect)
    deep = cv.KVEmbeddings((9, 10, 11), 1, 64, 4, 12)
    p = cv.save_catversion(tmp_path / "deep.safetensors", {"text": deep})
    with pytest.raises(ValueError, match=r"deep\.safetensors.*self-attention layer count 12, but this one has 2"):
        cv.load_catversion(p, expect=expect)
    p = cv.save_catversion(tmp_path / "sdxl.safetensors", {"clip_g": cv.KVEmbeddings((0,), 1, 64, 4, 2)})
    with pytest.raises(ValueError, match=r"sdxl\.safetensors holds embeddings for text encoder\(s\) \['clip_g'\]"):
        cv.load_catversion(p, expect=expect)
    from cat_train.adapters.export import save_lora
    lora = save_lora(tmp_path / "lora.safetensors", {"x": torch.zeros(1)}, {"ss_network_dim": "4"})
    with pytest.raises(ValueError, match="lora.safetensors is not a CatVersion file"):
        cv.load_catversion(lora)
    with pytest.raises(ValueError, match="hidden size 32"):  # installing directly checks too
        with cv.installed(text, wide):
            pass


def test_fast_path_encoder_in_eval_uses_the_embeddings():
    """nn.TransformerEncoderLayer runs a fused kernel in eval/no-grad that bypasses self_attn.forward."""
    torch.manual_seed(0)
    enc = WorldTextEncoder().eval()
    ids = torch.tensor([token_ids(p) for p in PROMPTS])
    emb = cv.new_embeddings(enc, cv.CatVersionSpec(layers=1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = enc(ids)
        with cv.installed(enc, emb):
            fast = enc(ids)
        with torch.enable_grad(), cv.installed(enc, emb):
            slow = enc(ids).detach()
    assert (fast - plain).abs().max() > 1e-2 and (fast - slow).abs().max() < 1e-5
    assert copy.deepcopy(enc) is not None  # nothing unpicklable left behind


def test_bench_method_names():
    from cat_train.world.catversion_bench import catversion_alpha, catversion_label
    assert catversion_alpha("catversion") == 0.0 and catversion_alpha("catversion+cat0.5") == 0.5
    assert catversion_label("catversion") == "CatVersion" and catversion_label("catversion+cat1") == (
            "CatVersion + CAT "
                                                                                                      "(α=1)")
    for bad in ("catversion+foo", "catversion+cat-1", "catversionx", "catversion+catnan"):
        with pytest.raises(ValueError):
            catversion_alpha(bad)


# ---------------------------------------------------------------- the shared training loop


def _run(base, tmp, steps=8, **kw):
    den, text = base
    cfg = cvt.CatVersionConfig(steps=steps, lr=1e-2, batch_size=2, alpha=1.0, class_word="circle", seed=5)
    return cvt.train_catversion(den, {"text": text}, text.encode, _items(), cv.CatVersionSpec(layers=2), cfg,
                                checkpoint_dir=str(tmp), **kw)


def _assert_left_as_found(den, text):
    assert all(not p.requires_grad for p in (*den.module.parameters(), *text.parameters()))
    assert all("forward" not in m.__dict__ for _, m in cv.find_self_attention(text))


def test_resume_and_cancel_are_bit_exact(base, tmp_path):
    from cat_train.training import checkpoint_path
    den, text = base
    full = _run(base, tmp_path / "a", save_every=2)
    resumed = _run(base, tmp_path / "b", resume=checkpoint_path(tmp_path / "a", 4))
    e1, e2 = full.embeddings["text"], resumed.embeddings["text"]
    assert torch.equal(e1.keys, e2.keys) and torch.equal(e1.values, e2.values)
    assert full.history == resumed.history and len(full.history) == 8 and full.history[0]["keep"] > 0

    with pytest.raises(Cancelled):
        _run(base, tmp_path / "c", callback=cancel_at(3))
    _assert_left_as_found(den, text)
    state = torch.load(checkpoint_path(tmp_path / "c", 3), weights_only=True)
    assert state["adapter"] == "catversion" and state["step"] == 3 and set(state["catversion"]) == {"text"}
    after_cancel = _run(base, tmp_path / "d", resume=checkpoint_path(tmp_path / "c", 3))
    assert torch.equal(after_cancel.embeddings["text"].keys, e1.keys) and after_cancel.history == full.history
    with pytest.raises(ValueError, match=r"cat-step000003\.pt was written by a run with other settings: "
                                         r".*spec\.layers 2 -> 1"):
        cvt.train_catversion(den, {"text": text}, text.encode, _items(), cv.CatVersionSpec(layers=1),
                             cvt.CatVersionConfig(steps=4, alpha=1.0, class_word="circle"),
                             resume=checkpoint_path(tmp_path / "c", 3))
    _assert_left_as_found(den, text)


def test_a_lora_checkpoint_is_refused_by_name(base, tiny_denoiser, text, tmp_path):
    from cat_train.adapters.lora import LoraSpec
    from cat_train.training import CatLossConfig
    from cat_train.training import TrainConfig, build_examples, checkpoint_path, train
    lc = CatLossConfig(alpha=0.0, preservation="strip")
    exs = build_examples([(torch.randn(4, 8, 8), "sks dog", ("sks",))], text, lc)
    train(tiny_denoiser, exs, lc, LoraSpec(rank=2), TrainConfig(steps=1, save_every=1, checkpoint_dir=str(tmp_path)))
    den, world_text = base
    with pytest.raises(ValueError, match=r"cat-step000001\.pt was written by a lora run, this run trains catversion"):
        cvt.train_catversion(den, {"text": world_text}, world_text.encode, _items(), cv.CatVersionSpec(layers=1),
                             cvt.CatVersionConfig(steps=2, class_word="circle"), resume=checkpoint_path(tmp_path, 1))
    _assert_left_as_found(den, world_text)


def test_grad_accumulation_runs_every_micro_batch(base, tmp_path):
    den, text = base
    calls, predict = [], den.predict
    den.predict = lambda x, t, c: calls.append(x.shape[0]) or predict(x, t, c)
    try:
        acc = _run(base, tmp_path / "a", steps=3, grad_accum=2)
    finally:
        den.predict = predict
    assert calls == [2, 4] * 2 * 3  # per micro-batch: frozen y (batch 2), adapted [y_T; y] (batch 4); 2 per step
    one = _run(base, tmp_path / "b", steps=3)
    assert len(acc.history) == 3 and not torch.equal(acc.embeddings["text"].keys, one.embeddings["text"].keys)


def test_mixed_precision_computes_in_bf16_and_keeps_fp32_embeddings(base, tmp_path):
    den, text = base
    dtypes, predict = [], den.predict

    def spy(x, t, c):
        out = predict(x, t, c)
        dtypes.append(out.dtype)
        return out
    den.predict = spy
    try:
        bf16 = _run(base, tmp_path / "a", steps=2, mixed_precision="bf16")
    finally:
        den.predict = predict
    fp32 = _run(base, tmp_path / "b", steps=2)
    assert set(dtypes) == {torch.bfloat16} and bf16.embeddings["text"].keys.dtype == torch.float32
    a, b = bf16.history[0]["loss"], fp32.history[0]["loss"]
    assert a != b and abs(a - b) < 0.05 * b  # same batch, bf16 rounding only


def test_out_of_memory_names_the_knobs_and_keeps_a_checkpoint(base, tmp_path):
    from cat_train.training import TrainingOutOfMemory, checkpoint_path
    den, text = base
    calls, predict = [], den.predict

    def oom_on_step_3(x, t, c):
        calls.append(1)
        if len(calls) > 2 * 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(x, t, c)
    den.predict = oom_on_step_3
    try:
        with pytest.raises(TrainingOutOfMemory, match="at step 3.*batch_size.*grad_accum.*bf16.*CatVersion layers or "
                                                      "embeddings"):
            _run(base, tmp_path)
    finally:
        den.predict = predict
    assert checkpoint_path(tmp_path, 2).exists()
    _assert_left_as_found(den, text)


def test_published_defaults_class_captions_flips_and_the_optional_prefix_logit(base):
    den, text = base
    seen = []

    def encode(ps):
        seen.extend(ps)
        return text.encode(ps)
    cfg = cvt.CatVersionConfig(steps=3, batch_size=2, class_word="circle", seed=0)
    assert (cfg.caption, cfg.flip) == ("class", 0.5)
    cvt.train_catversion(den, {"text": text}, encode, _items(), cv.CatVersionSpec(layers=1), cfg)
    assert seen and not any("sks" in p for p in seen) and "a circle on a grey background" in seen  # no placeholder
    seen.clear()
    cvt.train_catversion(den, {"text": text}, encode, _items(), cv.CatVersionSpec(layers=1),
                         cvt.CatVersionConfig(steps=1, caption="trigger", flip=0.0,
                                              seed=0))  # earlier: the trigger, no class word needed
    assert any("sks" in p for p in seen)
    with pytest.raises(ValueError, match="no class word is set"):
        cvt.train_catversion(den, {"text": text}, encode, _items(), cv.CatVersionSpec(layers=1),
                             cvt.CatVersionConfig(steps=1))
    # flips: the rows whose draw falls under p are mirrored in the image space, the others untouched
    den.augment_space = (lambda z: torch.nn.functional.pixel_shuffle(z, 2),
                         lambda x: torch.nn.functional.pixel_unshuffle(x, 2))
    try:
        flip = Flip(den, 0.5)
        x0 = torch.stack([it[0] for it in _items()])
        draws = torch.rand(5, generator=torch.Generator().manual_seed(4)) < 0.5
        out = flip.augment(x0, torch.zeros(5), torch.Generator().manual_seed(4))
    finally:
        del den.augment_space
    assert 0 < draws.sum() < 5
    for i in range(5):
        img, got = wm.decode(x0[i:i + 1]), wm.decode(out[i:i + 1])
        assert torch.equal(got, img.flip(-1) if draws[i] else img)
    # +1 on the prefix logit (the authors' code): softmax over [q.pk / sqrt(d) + 1, q.k / sqrt(d)]
    attn = cv.find_self_attention(text)[0][1]
    pk, pv = torch.randn(1, 64), torch.randn(1, 64)
    x = torch.randn(1, 3, 64)
    fwd = cv.prefixed_forward(attn, pk, pv, bias=1.0)
    got = fwd(x, x, x, need_weights=False)[0]
    q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    k, v = torch.cat([pk[None], k], 1), torch.cat([pv[None], v], 1)
    h, d = attn.num_heads, 64 // attn.num_heads
    qh, kh, vh = (t.view(1, -1, h, d).transpose(1, 2) for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / d ** 0.5
    logits[..., 0] += 1
    manual = attn.out_proj((logits.softmax(-1) @ vh).transpose(1, 2).reshape(1, 3, 64))
    assert torch.allclose(got, manual, atol=1e-5)
    assert not torch.allclose(cv.prefixed_forward(attn, pk, pv)(x, x, x, need_weights=False)[0], manual, atol=1e-3)
