"""APT's three parts on the tiny UNet: each one's defining property, composition with CAT, exact resume."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, adapter_disabled, adapter_parameters, inject_lora
from cat_train.step.conds import cat_cond
from cat_train.terms.apt import AptRun, Indicator, augment
from cat_train.terms.apt_config import AptConfig
from cat_train.training import CatLossConfig, TrainConfig, build_examples, checkpoint_path, train
from lora_objective import objective


def batch(b=2, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        {"context": torch.randn(b, 6, 64, generator=g)}, {"context": torch.randn(b, 6, 64, generator=g)}


def evaluate(run, x0, noise, t, cond_token, cond_pres, alpha):
    """One evaluation of CAT with APT alone plugged in, as the loop makes it (the indicator moves after it): the
    objective's terms, the fit weight it applied and APT's two penalties."""
    fit_weight = run.fit_weight(t)  # as the objective applies it, before the indicator moves
    terms = objective(run.denoiser, x0, noise, t, cond_token, cond_pres, alpha, terms=(run,))
    run.after_objective(t, terms)
    return SimpleNamespace(**terms._asdict(), fit_weight=fit_weight.to(terms.fit), **run.penalties)


def step_lora(den, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(den.module):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def examples(text, n=3, cfg=None):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, cfg or CatLossConfig(class_word="dog"))


def test_stabilization_is_exactly_zero_at_init_and_positive_after_a_step(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))
    run = AptRun(tiny_denoiser, AptConfig(stabilize=1.0))
    # every self-attention
    assert len(run.taps.stabilized) == 7 and all(n.endswith(".attn1") for n in run.taps.stabilized)
    # middle + output blocks
    assert len(AptRun(tiny_denoiser, AptConfig.earlier(stabilize=1.0)).taps.stabilized) == 1 + 4
    at_init = evaluate(run, *batch(), alpha=1.0)
    assert at_init.stabilize.item() == 0.0  # LoRA B = 0: adapted features equal the frozen ones bit for bit
    step_lora(tiny_denoiser)
    after = evaluate(run, *batch(), alpha=1.0)
    assert after.stabilize.item() > 1e-6
    run.close()
    x0, noise, t, c_tok, _ = batch()
    x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)

    def features(module):
        feats = []
        hook = module.register_forward_hook(lambda m, i, o: feats.append(o))
        with torch.no_grad():
            tiny_denoiser.predict(x_t, t, c_tok)
            with adapter_disabled(tiny_denoiser.module):
                tiny_denoiser.predict(x_t, t, c_tok)
        hook.remove()
        return feats

    # the paper's form (write-ups): plain L2 of the shift of per-channel mean and std of a self-attention's tokens
    name = "middle_block.1.transformer_blocks.0.attn1"
    run = AptRun(tiny_denoiser, AptConfig(stabilize=1.0, stabilize_layers=name.replace(".", r"\.")))
    # The formula, not the bits: the features are the ones the term saw (the same two passes of batch 2), reduced in
    # float32 by the term and in float64 here. The penalty squares adapted-minus-frozen shifts about 1e-3 of a
    # feature's size, so the term's float32 means keep ~1e-4 of the penalty's digits whatever order a CPU sums in;
    # another formula (variance for std, a missing square) is off by far more.
    a, f = (x.double() for x in features(dict(tiny_denoiser.module.named_modules())[name]))
    manual = (a.mean(1) - f.mean(1)).pow(2).mean() + (a.std(1, unbiased=False) - f.std(1, unbiased=False)).pow(2).mean()
    got = evaluate(run, x0, noise, t, c_tok, c_tok, alpha=0.0).stabilize
    assert torch.allclose(got.double(), manual, rtol=1e-3, atol=0), (got, manual)
    run.close()
    # the earlier form: block output, mean and variance in units of the frozen variance
    run = AptRun(tiny_denoiser, AptConfig.earlier(stabilize=1.0, stabilize_layers="middle_block"))
    a, f = (x.double() for x in features(tiny_denoiser.module.middle_block))
    va, vf = a.var((2, 3), unbiased=False), f.var((2, 3), unbiased=False)
    manual = ((a.mean((2, 3)) - f.mean((2, 3))).pow(2) / vf).mean() + ((va - vf) / vf).pow(2).mean()
    got = evaluate(run, x0, noise, t, c_tok, c_tok, alpha=0.0).stabilize
    assert torch.allclose(got.double(), manual, rtol=1e-3, atol=0), (got, manual)
    run.close()
    assert not tiny_denoiser.module.middle_block._forward_hooks


def test_aligned_attention_maps_are_the_frozen_ones_at_init_and_only_regularised_layers_build_them(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    run = AptRun(tiny_denoiser, AptConfig(align=1.0))
    assert run.taps.aligned and all(n.endswith(".attn2") for n in run.taps.aligned)
    x0, noise, t, c_tok, c_pres = batch()
    x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
    with torch.no_grad(), adapter_disabled(tiny_denoiser.module), run.taps.recording("frozen"):
        tiny_denoiser.predict(x_t, t, c_tok)
    with torch.no_grad(), run.taps.recording("adapted"):
        tiny_denoiser.predict(x_t, t, c_tok)
    frozen, adapted = run.taps.probs["frozen"], run.taps.probs["adapted"]
    assert set(frozen) == set(adapted) == set(run.taps.aligned)  # attn1 (self-attention) never materialised
    for n in frozen:
        assert torch.equal(frozen[n], adapted[n])
        assert torch.allclose(frozen[n].sum(-1), torch.ones(()), atol=1e-6)
        assert frozen[n].shape[-1] == c_tok["context"].shape[1]  # over the caption's tokens
    # the layers still run their own fused attention: their outputs are what they were without hooks
    attn = dict(tiny_denoiser.module.named_modules())[run.taps.aligned[0]]
    x, ctx = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 6, 64)
    with run.taps.recording("adapted"):
        hooked = attn(x, ctx)
    run.close()
    assert torch.equal(hooked, attn(x, ctx))
    run = AptRun(tiny_denoiser, AptConfig(align=1.0))
    assert evaluate(run, x0, noise, t, c_tok, c_pres, alpha=1.0).align.item() == 0.0
    step_lora(tiny_denoiser, scale=0.3)
    moved = evaluate(run, x0, noise, t, c_tok, c_pres, alpha=1.0)
    assert moved.align.item() > 1e-8
    run.close()
    # align_skip_triggers: the trigger's key columns leave the MSE; the rest is averaged as before
    run = AptRun(tiny_denoiser, AptConfig(align=1.0, align_skip_triggers=True))
    run.see_batch([type("E", (), {"trigger_tokens": (1,)})(), type("E", (), {"trigger_tokens": (2, 4)})()])
    skipped = evaluate(run, x0, noise, t, c_tok, c_pres, alpha=1.0).align
    # the maps as the objective made them: [y_T; y] rows in each pass (a batch of 2 alone rounds its GEMMs otherwise)
    rows = (torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(c_tok, c_pres))
    with torch.no_grad(), adapter_disabled(tiny_denoiser.module), run.taps.recording("frozen"):
        tiny_denoiser.predict(*rows)
    with torch.no_grad(), run.taps.recording("adapted"):
        tiny_denoiser.predict(*rows)
    manual = []
    for n in run.taps.aligned:
        d = (run.taps.probs["adapted"][n][:2].double() - run.taps.probs["frozen"][n][:2].double()).pow(2)
        manual.append(torch.cat([d[0][..., [0, 2, 3, 4, 5]].flatten(), d[1][..., [0, 1, 3, 5]].flatten()]).mean())
    # the same maps, averaged in float32 by the term and in float64 here: squared differences of probabilities close
    # to each other keep ~1e-4 of their digits in float32, whatever order a CPU sums them in
    assert torch.allclose(skipped.double(), torch.stack(manual).mean(), rtol=1e-3), (skipped, manual)
    assert not torch.allclose(skipped, moved.align, rtol=1e-3)
    run.close()


def test_a_bin_whose_indicator_rises_gets_a_lower_weight_and_stronger_augmentation():
    cfg = AptConfig(adaptive=1.0, bins=10, ema=0.5, min_weight=0.1, max_augment=0.8, form="relative")
    ind = Indicator(cfg, 1000)
    bins = torch.arange(10)
    assert ind.fit_weight(bins).eq(1).all() and ind.augment_prob(bins).eq(0).all()
    assert ind.bin_of(torch.tensor([0, 99, 100, 999])).tolist() == [0, 0, 1, 9]
    seen = []
    for _ in range(4):  # adapted error half the pretrained one in bin 3: indicator -> 0.5
        ind.update(torch.tensor([3]), torch.tensor([1.0]), torch.tensor([0.5]))
        seen.append((ind.value[3].item(), ind.fit_weight(bins)[3].item(), ind.augment_prob(bins)[3].item()))
    assert [round(v, 4) for v, _, _ in seen] == [0.25, 0.375, 0.4375, 0.4688]
    assert all(w1 > w2 for (_, w1, _), (_, w2, _) in zip(seen, seen[1:]))      # weight falls as the indicator rises
    assert all(p1 < p2 for (_, _, p1), (_, _, p2) in zip(seen, seen[1:]))      # augmentation rises
    assert ind.fit_weight(bins)[3].item() == 1 - seen[-1][0] and ind.fit_weight(bins)[0].item() == 1.0
    assert ind.augment_prob(bins)[0].item() == 0.0
    for _ in range(40):  # a bin the adapter reproduces exactly: floor and ceiling hold
        ind.update(torch.tensor([5]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert ind.fit_weight(bins)[5].item() == 0.1 and ind.augment_prob(bins)[5].item() == 0.8
    off = Indicator(AptConfig(stabilize=1.0), 1000)
    off.value[:] = 0.9
    assert off.fit_weight(bins).eq(1).all() and off.augment_prob(bins).eq(0).all()  # adaptive = 0: no effect


def test_paper_indicator_matches_a_hand_computation_of_the_formula():
    """gamma_b = 1 - exp(-T (EMA_b[L_pre] - EMA_b[L_ft])), each EMA with new-value weight 0.1 started from its first
    value; augmentation min(gamma_b, p_max), fit weight 1 - gamma_b."""
    T = 1000
    ind = Indicator(AptConfig(adaptive=1.0, max_augment=0.8), T)  # the defaults: form paper, 10 bins, ema 0.9
    losses = [(0.100, 0.100), (0.104, 0.098), (0.096, 0.094), (0.110, 0.101)]  # (L_pre, L_ft) of samples in bin 7
    for lp, lf in losses:
        ind.update(torch.tensor([750]) * 10 // T, torch.tensor([lp], dtype=torch.float64),
                   torch.tensor([lf], dtype=torch.float64))
    # by hand: EMA[L_pre] 0.1 -> 0.9*0.1 + 0.1*0.104 = 0.1004 -> 0.09036 + 0.0096 = 0.09996 -> 0.089964 + 0.011 =
    # 0.100964
    #          EMA[L_ft]  0.1 -> 0.09 + 0.0098 = 0.0998 -> 0.08982 + 0.0094 = 0.09922 -> 0.089298 + 0.0101 = 0.099398
    #          gamma = 1 - exp(-1000 * 0.001566) = 1 - exp(-1.566)
    gamma = 1 - math.exp(-1.566)
    assert ind.pre[7].item() == pytest.approx(0.100964, abs=1e-12)
    assert ind.ft[7].item() == pytest.approx(0.099398, abs=1e-12)
    bins = torch.arange(10)
    assert ind.value[7].item() == pytest.approx(gamma, abs=1e-12)
    assert ind.fit_weight(bins)[7].item() == pytest.approx(1 - gamma, abs=1e-12)
    assert ind.augment_prob(bins)[7].item() == pytest.approx(gamma, abs=1e-12) and 0.79 < gamma < 0.8  # below p_max
    ind.update(torch.tensor([7]), torch.tensor([0.2]), torch.tensor([0.1]))  # a large gap: p_max caps the probability
    assert ind.augment_prob(bins)[7].item() == 0.8 and ind.fit_weight(bins)[7].item() < 1e-3
    assert ind.value[:7].eq(0).all() and ind.fit_weight(bins)[0].item() == 1.0  # untouched bins
    # the scale the relative form lacks: an absolute gap of 0.003 gives 1 - e^-3 = 0.95
    one = Indicator(AptConfig(adaptive=1.0), T)
    one.update(torch.tensor([0]), torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.197], dtype=torch.float64))
    assert one.value[0].item() == pytest.approx(1 - math.exp(-3), abs=1e-9)
    one.update(torch.tensor([1]), torch.tensor([0.1]), torch.tensor([0.2]))  # fine-tuned worse: 0, not negative
    assert one.value[1].item() == 0.0 and one.fit_weight(torch.tensor([1])).item() == 1.0
    with pytest.raises(ValueError, match="form 'paper', this run 'relative'"):
        Indicator(AptConfig.earlier(adaptive=1.0), T).load_state_dict(one.state_dict())


def test_augmentation_follows_its_probability_and_draws_the_same_amount_either_way():
    x = torch.randn(6, 4, 16, 16)
    cfg = AptConfig(adaptive=1.0, augment_ops=("flip", "zoom", "rotate", "shift", "color"))
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, torch.zeros(6, dtype=torch.float64), cfg, g0), x)
    out = augment(x, torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.float64), cfg, g1)
    assert torch.equal(out[3:], x[3:]) and all(not torch.allclose(out[i], x[i], atol=1e-3) for i in range(3))
    assert torch.equal(g0.get_state(), g1.get_state())
    flat = torch.full((2, 3, 8, 8), 0.3)
    zoomed = augment(flat, torch.ones(2, dtype=torch.float64), AptConfig.earlier(adaptive=1.0),
                     torch.Generator().manual_seed(1))
    # earlier: zoom-out/rotation pad by reflection, no foreign border value
    assert torch.allclose(zoomed, flat, atol=1e-6)
    # the paper's: zoom-out 1-3x onto black (-1 in an image space; the world's latent is one)
    img = torch.full((400, 3, 32, 32), 0.3)
    cfg = AptConfig(adaptive=1.0, augment_ops=("zoom",))
    out = augment(img, torch.ones(400, dtype=torch.float64), cfg, torch.Generator().manual_seed(2),
                  (lambda z: z, lambda z: z))
    content = (out > 0).double().mean((1, 2, 3))  # area of the subject = 1 / f^2, f uniform in [1, 3]
    assert out.min().item() == pytest.approx(-1.0, abs=1e-6) and content.min().item() > 1 / 9 - 0.03
    assert content.max().item() > 0.9 and content.mean().item() == pytest.approx(1 / 3, abs=0.03)  # E[1/f^2] = 1/3


def test_apt_with_cat_uses_one_frozen_and_one_adapted_forward(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    step_lora(tiny_denoiser)
    run = AptRun(tiny_denoiser, AptConfig(adaptive=1.0, stabilize=1.0, align=1.0))
    calls, predict = [], tiny_denoiser.predict
    tiny_denoiser.predict = lambda x, t_, c: calls.append((x.shape[0], torch.is_grad_enabled())) or predict(x, t_, c)
    terms = evaluate(run, *batch(), alpha=1.0)
    assert calls == [(4, False), (4, True)]  # [y_T; y] frozen (targets for CAT and APT), [y_T; y] adapted
    assert terms.keep.min() > 0 and terms.fit_pre.min() > 0
    assert torch.allclose(terms.loss,
                          (terms.fit_weight * terms.fit + terms.keep).mean() + terms.stabilize + terms.align)
    calls.clear()
    evaluate(run, *batch(), alpha=0.0)
    assert calls == [(2, False), (2, True)]  # APT alone: y_T rows only
    run.close()


def test_resume_with_apt_is_bit_exact_and_keeps_the_indicator(tiny_denoiser, text, tmp_path):
    apt = AptConfig(adaptive=2.0, stabilize=1.0, align=1.0, augment_ops=("flip", "zoom", "rotate", "shift", "color"))
    lc = CatLossConfig(alpha=1.0, class_word="dog", apt=apt)
    exs = examples(text, cfg=lc)

    def run(tmp, **kw):
        cfg = TrainConfig(steps=8, lr=3e-3, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                          checkpoint_dir=str(tmp))
        return train(tiny_denoiser, exs, lc, LoraSpec(rank=4, dropout=0.1), cfg, **kw)

    infos = []
    full = run(tmp_path / "a", save_every=2, callback=infos.append)
    resumed = run(tmp_path / "b", resume=checkpoint_path(tmp_path / "a", 4))
    for k in full.weights:
        assert torch.equal(full.weights[k].down, resumed.weights[k].down)
        assert torch.equal(full.weights[k].up, resumed.weights[k].up)
    assert full.history == resumed.history  # losses, penalties and the per-bin indicator, step by step
    assert any(v for v in full.history[-1]["indicator"] if v)  # the indicator moved
    assert infos[-1].reports["apt"]["indicator"] == full.history[-1]["indicator"]
    assert len(infos[-1].reports["apt"]["fit_weight"]) == apt.bins
    state = torch.load(checkpoint_path(tmp_path / "a", 4), weights_only=True)
    assert state["apt"]["count"].sum().item() == 4 * 2  # every sample of the first 4 steps updated its bin
    assert state["apt"]["form"] == "paper" and state["apt"]["pre"].gt(0).sum() == state["apt"]["count"].gt(0).sum()
    assert not tiny_denoiser.module.middle_block._forward_hooks  # hooks removed with the adapter


def test_lora_metadata_records_every_apt_setting():
    cfg = AptConfig(adaptive=0.5, stabilize=2.0, align=0.1, bins=4, augment_ops=("flip",))
    meta = cfg.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    stored = json.loads(meta["cat_apt"])
    assert stored == {k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}
    assert meta["cat_apt_active"] == "true" and AptConfig().metadata()["cat_apt_active"] == "false"


def test_bench_apt_methods_switch_on_the_named_parts_over_their_base_method():
    import argparse

    import pytest

    from cat_train.world import bench

    class Text:
        def encode_text(self, ps):
            return {"context": torch.tensor([[[float(len(p))]] for p in ps])}

    c = bench.BenchConfig()
    want = {"apt": (0.0, c.apt_adaptive, c.apt_stabilize, c.apt_align), "apt:ada": (0.0, c.apt_adaptive, 0, 0),
            "apt:rs": (0.0, 0, c.apt_stabilize, 0), "apt:aa": (0.0, 0, 0, c.apt_align),
            "cat0.5+apt": (0.5, c.apt_adaptive, c.apt_stabilize, c.apt_align)}
    for m, (alpha, ada, rs, aa) in want.items():
        assert bench.method_name(m) == m
        ex, lc, bs = bench.examples_for(m, Text(), c, seed=0)
        assert (lc.alpha, lc.apt.adaptive, lc.apt.stabilize, lc.apt.align) == (alpha, ada, rs, aa), m
        assert bs == 1 and len(ex) == 5
    assert bench.label("cat1+apt") == "CAT (α=1) + APT" and bench.label("apt:rs") == "APT stabilization only (α=0)"
    for bad in ("apt:xx", "prior+apt", "cat+apt", "lora+foo"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.method_name(bad)
