"""Masked training (cat_train/terms/mask.py): the mask-weighted fit, the background keep term, and the off switch."""
import dataclasses

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, adapter_parameters, inject_lora
from cat_train.training import CatLossConfig
from lora_objective import objective
from cat_train.terms.apt_config import AptConfig
from cat_train.data.masks import latent_mask
from cat_train.terms.mask import MaskedLoss, MaskSettings
from cat_train.terms import registry
from cat_train.training import Example, TrainConfig, build_examples, checkpoint_path, train


def batch(b=2, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        {"context": torch.randn(b, 6, 64, generator=g)}, {"context": torch.randn(b, 6, 64, generator=g)}


def half_mask(hw=8):
    m = torch.zeros(1, hw, hw)
    m[:, :, : hw // 2] = 1.0  # subject on the left half
    return m


def term_with(floor, keep, masks, denoiser=None):
    term = MaskedLoss(denoiser, MaskSettings(floor, keep))
    term.see_batch([Example(torch.zeros(4, 8, 8), {}, {}, mask=m) for m in masks])
    return term


def randomize(unet, scale=0.05):
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.normal_(0, scale)


def test_masked_fit_is_the_hand_computed_weighted_mean(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    randomize(tiny_denoiser.module)
    x0, noise, t, c_tok, c_pres = batch()
    masks = [half_mask(), None]  # the second image has no mask: weight 1 everywhere
    terms = objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=1.0, terms=[term_with(0.25, 0.0, masks)])
    with torch.no_grad():
        x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
        d2 = (tiny_denoiser.predict(x_t, t, c_tok) - noise).pow(2)  # (2, 4, 8, 8), eps target
    w0 = torch.full((8, 8), 0.25)
    w0[:, :4] = 1.0
    by_hand0 = (d2[0] * w0).sum() / (4 * w0.sum())
    assert terms.fit[0].item() == pytest.approx(by_hand0.item(), rel=1e-5)
    assert terms.fit[1].item() == pytest.approx(d2[1].mean().item(), rel=1e-5)
    plain = objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=1.0)
    assert abs(terms.fit[0] - plain.fit[0]) > 1e-4  # the weighting changed something
    assert torch.allclose(terms.loss, (terms.fit + terms.keep).mean(), rtol=1e-6)


def test_all_ones_mask_equals_unmasked_bit_for_bit(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    randomize(tiny_denoiser.module)
    args = batch()
    plain = objective(tiny_denoiser, *args, alpha=1.0)
    plain.loss.backward()
    g_plain = [p.grad.clone() for p in adapter_parameters(tiny_denoiser.module)]
    for p in adapter_parameters(tiny_denoiser.module):
        p.grad = None
    ones = objective(tiny_denoiser, *args, alpha=1.0, terms=[term_with(0.1, 0.0, [torch.ones(1, 8, 8)] * 2)])
    ones.loss.backward()
    assert torch.equal(plain.loss, ones.loss) and torch.equal(plain.fit, ones.fit)
    assert all(torch.equal(a, p.grad) for a, p in zip(g_plain, adapter_parameters(tiny_denoiser.module)))


def test_background_keep_is_zero_at_init_and_where_all_is_subject(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    args = batch()
    calls = []
    predict = tiny_denoiser.predict
    tiny_denoiser.predict = lambda x, t_, c: calls.append(x.shape[0]) or predict(x, t_, c)
    term = term_with(1.0, 2.0, [half_mask()] * 2)
    assert term.needs_frozen_token_pass
    at_init = objective(tiny_denoiser, *args, alpha=1.0, terms=[term])
    assert calls == [4, 4]  # frozen [y_T, y], adapted [y_T, y]: no pass of its own
    assert term.report()["background_keep"] < 1e-12  # LoRA B = 0: adapted == frozen
    randomize(tiny_denoiser.module)
    trained = objective(tiny_denoiser, *args, alpha=1.0, terms=[term])
    bg = term.report()["background_keep"]
    assert bg > 1e-6
    assert torch.allclose(trained.loss, (trained.fit + trained.keep).mean() + 2.0 * bg, rtol=1e-5)
    full = term_with(1.0, 2.0, [torch.ones(1, 8, 8)] * 2)
    objective(tiny_denoiser, *args, alpha=1.0, terms=[full])
    assert full.report()["background_keep"] == 0.0
    assert at_init.loss.isfinite()


def test_background_keep_hand_computed(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    randomize(tiny_denoiser.module)
    x0, noise, t, c_tok, c_pres = batch()
    term = term_with(1.0, 1.0, [half_mask(), half_mask()])
    objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=0.0, terms=[term])
    with torch.no_grad():
        x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
        adapted = tiny_denoiser.predict(x_t, t, c_tok)
        from cat_train.adapters.lora import adapter_disabled
        with adapter_disabled(tiny_denoiser.module):
            frozen = tiny_denoiser.predict(x_t, t, c_tok)
    by_hand = (adapted - frozen)[..., 4:].pow(2).sum() / adapted.numel()  # background: the right half
    assert term.report()["background_keep"] == pytest.approx(by_hand.item(), rel=1e-4)


def test_off_by_default_and_settings_checked():
    cfg = CatLossConfig()
    assert not cfg.mask.active and registry.build(cfg, TrainConfig(), None, None) == []
    meta = registry.metadata(cfg, TrainConfig())
    assert meta["cat_mask_floor"] == "1.0" and meta["cat_mask_keep"] == "0.0"
    with pytest.raises(ValueError, match="mask_floor"):
        CatLossConfig(mask_floor=1.5)
    with pytest.raises(ValueError, match="mask_keep"):
        CatLossConfig(mask_keep=-1)
    with pytest.raises(ValueError, match="augment_ops"):
        CatLossConfig(mask_floor=0.1, apt=AptConfig(adaptive=1.0))
    CatLossConfig(mask_floor=0.1, apt=AptConfig(adaptive=1.0, augment_ops=()))  # weighting only: fine


def test_latent_mask_averages_pixels():
    m = torch.zeros(16, 32)
    m[:, :12] = 1.0
    lat = latent_mask(m, (2, 4))
    assert lat.shape == (1, 2, 4)
    assert lat[0, 0].tolist() == [1.0, 0.5, 0.0, 0.0]


def masked_examples(text, masks):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",), 1,
              m) for i, m in enumerate(masks)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def run(denoiser, exs, tmp, steps, loss, **kw):
    cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                      checkpoint_dir=str(tmp))
    return train(denoiser, exs, loss, LoraSpec(rank=4), cfg, **kw)


def test_masked_run_resumes_exactly_and_records_background_keep(tiny_denoiser, text, tmp_path):
    exs = masked_examples(text, [half_mask(), None, half_mask()])
    assert exs[0].mask.shape == (1, 8, 8) and exs[1].mask is None
    loss = CatLossConfig(class_word="dog", mask_floor=0.2, mask_keep=1.0)
    full = run(tiny_denoiser, exs, tmp_path / "a", 6, loss, save_every=3)
    resumed = run(tiny_denoiser, exs, tmp_path / "b", 6, loss, resume=checkpoint_path(tmp_path / "a", 3))
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert all(torch.equal(full.weights[k].up, resumed.weights[k].up) for k in full.weights)
    assert "background_keep" in full.history[-1] and full.history[-1]["background_keep"] > 0
    other = dataclasses.replace(loss, mask_floor=0.5)
    with pytest.raises(ValueError, match="mask_floor"):
        run(tiny_denoiser, exs, tmp_path / "c", 6, other, resume=checkpoint_path(tmp_path / "a", 3))


def test_masks_without_mask_settings_train_as_before(tiny_denoiser, text, tmp_path):
    """Masks on the examples but floor 1 and keep 0: no term is built and the run is the unmasked one."""
    masked = masked_examples(text, [half_mask()] * 3)
    plain = masked_examples(text, [None] * 3)
    loss = CatLossConfig(class_word="dog")
    a = run(tiny_denoiser, masked, tmp_path / "a", 3, loss)
    b = run(tiny_denoiser, plain, tmp_path / "b", 3, loss)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_frozen_fit_is_weighted_as_the_adapted_fit(tiny_denoiser):
    """APT compares fit with fit_pre: both must be the same mask-weighted mean."""
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    x0, noise, t, c_tok, c_pres = batch()
    terms = objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=1.0,
                      terms=[term_with(0.0, 1.0, [half_mask()] * 2)])
    assert torch.allclose(terms.fit_pre, terms.fit, rtol=1e-6)  # LoRA B = 0: the same predictions
    with torch.no_grad():
        x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
        d2 = (tiny_denoiser.predict(x_t, t, c_tok) - noise).pow(2)
    # floor 0: the subject only
    assert terms.fit_pre[0].item() == pytest.approx(d2[0, :, :, :4].mean().item(), rel=1e-5)


def test_run_settings_leave_mask_fields_out_at_their_defaults():
    """Checkpoints and run folders from before masked training recorded no mask fields: runs with masks off match
    them."""
    from types import SimpleNamespace

    from cat_train.training.run_folder import result_settings

    lora = SimpleNamespace(name="lora", spec=None)
    off = result_settings(TrainConfig(), CatLossConfig(), lora, {}, None)["loss"]
    assert "mask_floor" not in off and "mask_keep" not in off and "alpha" in off
    on = result_settings(TrainConfig(), CatLossConfig(mask_floor=0.1), lora, {}, None)["loss"]
    assert on["mask_floor"] == repr(0.1) and "mask_keep" not in on


def test_all_black_masks_with_floor_0_are_refused_before_step_1(tiny_denoiser, text, tmp_path):
    """Issue 32: every mask all black and mask_floor 0 trained a LoRA of zeros (the fit weighs nothing anywhere)."""
    from cat_train.terms.mask import check_masks

    black = torch.zeros(1, 8, 8)
    steps: list = []
    with pytest.raises(ValueError, match=r"every training image's mask is all black \(image 1, image 2\).*the LoRA "
                                         r"would learn nothing.*or raise mask_floor \(e.g. 0.1\)"):
        run(tiny_denoiser, masked_examples(text, [black, black]), tmp_path / "a", 3,
            CatLossConfig(class_word="dog", mask_floor=0.0), callback=steps.append)
    assert steps == []
    assert check_masks([black, half_mask(), None], 0.0, ["a.png", "b.png", "c.png"]) == [
        "1 of 3 training images have an all-black mask (a.png): with mask_floor 0 they train nothing. Masks are white "
        "on the subject: fix those masks or remove them."]
    assert check_masks([black, black], 0.1) == []  # the background still weighs something
