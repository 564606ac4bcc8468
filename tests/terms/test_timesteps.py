"""Timestep weighting (min-SNR-γ) and the timestep range, on the tiny UNet: weights by hand, draws bit for bit."""
import math

import pytest
import torch

from cat_train.adapters.lora import LoraSpec
from cat_train.step.denoiser import FlowSchedule, ModuleDenoiser, NoiseSchedule, time_shift
from cat_train.training import CatLossConfig
from lora_objective import objective
from cat_train.terms import registry
from cat_train.training.run_folder import result_settings
from cat_train.terms.min_snr import MinSnrWeight, min_snr_weight
from cat_train.training import BatchSampler, TrainConfig, build_examples, checkpoint_path, train


def abar_by_hand(t: int) -> float:
    """SD's scaled-linear schedule written out: betas linear in sqrt between 0.00085 and 0.012 over 1000 steps."""
    a, b = math.sqrt(0.00085), math.sqrt(0.012)
    out = 1.0
    for i in range(t + 1):
        out *= 1 - (a + (b - a) * i / 999) ** 2
    return out


@pytest.mark.parametrize("t", [0, 20, 100, 400, 999])
def test_min_snr_weights_eps_and_v_by_hand(t):
    s, gamma = NoiseSchedule.scaled_linear(), 5.0
    ab = abar_by_hand(t)
    snr = ab / (1 - ab)
    eps = float(min_snr_weight(s, "eps", torch.tensor([t]), gamma))
    v = float(min_snr_weight(s, "v", torch.tensor([t]), gamma))
    assert eps == pytest.approx(min(snr, gamma) / snr, rel=1e-9)
    assert v == pytest.approx(min(snr, gamma) / (snr + 1), rel=1e-9)
    if snr < gamma:  # high noise: eps unweighted, v weighted by abar
        assert eps == 1.0 and v == pytest.approx(ab, rel=1e-9)


def test_min_snr_weight_flow_by_hand():
    # sigma 0.1: SNR 81 -> min 5, times 0.01; sigma 0.5: SNR 1 -> 1 * 0.25; sigma 0.9: SNR 1/81 -> (1/81) * 0.81
    w = min_snr_weight(FlowSchedule(), "flow", torch.tensor([100.0, 500.0, 900.0]), 5.0)
    torch.testing.assert_close(w, torch.tensor([0.05, 0.25, 0.01], dtype=torch.float64), rtol=1e-12, atol=0)
    # the same x0-space weight as eps's: min(SNR, γ)/SNR on the eps loss, and eps error = (1 - σ) velocity error
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    snr = ((1 - s) / s) ** 2
    torch.testing.assert_close(w, snr.clamp(max=5.0) / snr * (1 - s) ** 2, rtol=1e-12, atol=0)


def test_min_snr_weights_the_fit_term_only(tiny_denoiser):
    from cat_train.adapters.lora import inject_lora

    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 300, 900])
    c = {"context": torch.randn(3, 6, 64, generator=g)}
    term = MinSnrWeight(tiny_denoiser, 5.0)
    plain = objective(tiny_denoiser, x0, noise, t, c, c, 1.0)
    weighted = objective(tiny_denoiser, x0, noise, t, c, c, 1.0, terms=[term])
    w = min_snr_weight(tiny_denoiser.schedule, "eps", t, 5.0).float()
    assert float(w[0]) < 0.1 and float(w[2]) == 1.0
    torch.testing.assert_close(weighted.fit, plain.fit)
    torch.testing.assert_close(weighted.loss, (w * plain.fit + plain.keep).mean())


def test_min_snr_off_adds_no_term_and_on_is_registered(tiny_denoiser):
    assert registry.build(CatLossConfig(), TrainConfig(), tiny_denoiser, None) == []
    terms = registry.build(CatLossConfig(min_snr_gamma=5.0), TrainConfig(), tiny_denoiser, None)
    assert [type(x) for x in terms] == [MinSnrWeight]
    with pytest.raises(ValueError, match="min_snr_gamma must be a finite number >= 0"):
        CatLossConfig(min_snr_gamma=-1.0)


def test_ddpm_range_draws_only_inside_and_full_range_is_todays_draw():
    s = NoiseSchedule.scaled_linear()
    t = s.sample_t(20000, torch.Generator().manual_seed(1), 200, 700)
    assert int(t.min()) == 200 and int(t.max()) == 699  # [min, max), every end reached in 20000 draws
    full = s.sample_t(64, torch.Generator().manual_seed(2), 0, 1000)
    assert torch.equal(full, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2)))


def test_flow_range_maps_sigma_and_full_range_is_todays_draw():
    s = FlowSchedule(shift=3.0)
    t = s.sample_t(20000, torch.Generator().manual_seed(1), 200, 700)
    assert 200 <= float(t.min()) < 230 and 690 < float(t.max()) <= 700  # logit-normal, shifted: few draws near the ends
    u = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    torch.testing.assert_close(t, ((0.2 + 0.5 * time_shift(3.0, u)) * 1000).float(), rtol=0, atol=1e-3)
    full = s.sample_t(64, torch.Generator().manual_seed(2), 0, 1000)
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert torch.equal(full, (time_shift(3.0, u).clamp(1e-4, 1 - 1e-4) * 1000).float())  # the formula before the option


def test_sampler_default_draws_as_before(text):
    exs = _examples(text)
    sampler = BatchSampler(exs, 2)
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(5):
        idx, t, noise = sampler.draw_batch(g, NoiseSchedule.scaled_linear())
        assert idx == sampler.draw(ref)
        assert torch.equal(t, torch.randint(0, 1000, (2,), generator=ref))
        assert torch.equal(noise, torch.randn(noise.shape, generator=ref))


def test_train_draws_within_the_range(tiny_denoiser, text):
    seen = []

    class Spy(MinSnrWeight):
        def fit_weight(self, t):
            seen.append(t.clone())
            return super().fit_weight(t)
    train(tiny_denoiser, _examples(text), CatLossConfig(class_word="dog"), LoraSpec(rank=2),
          TrainConfig(steps=6, batch_size=2, timestep_min=900, timestep_max=950), extra_terms=[Spy(tiny_denoiser, 5.0)])
    t = torch.cat(seen)
    assert len(t) == 12 and int(t.min()) >= 900 and int(t.max()) < 950


def test_timestep_range_is_checked():
    with pytest.raises(ValueError, match="0 <= timestep_min < timestep_max <= 1000"):
        TrainConfig(timestep_min=500, timestep_max=500)


@pytest.mark.parametrize("opts",
                         [dict(loss=dict(min_snr_gamma=5.0)), dict(cfg=dict(timestep_min=100, timestep_max=600))])
def test_resume_bit_exact_with_option_on(tiny_denoiser, text, tmp_path, opts):
    exs = _examples(text)

    def run(folder, steps, o=opts, **kw):
        cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, seed=7, checkpoint_dir=str(folder),
                          save_every=kw.pop("save_every", 0), **o.get("cfg", {}))
        return train(tiny_denoiser, exs, CatLossConfig(class_word="dog", **o.get("loss", {})),
                     LoraSpec(rank=4, dropout=0.1), cfg, **kw)
    full = run(tmp_path / "a", 6, save_every=3)
    resumed = run(tmp_path / "b", 6, resume=checkpoint_path(tmp_path / "a", 3))
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    for k in full.weights:
        assert torch.equal(full.weights[k].up, resumed.weights[k].up)
    plain = run(tmp_path / "c", 6, o={})
    assert [h["loss"] for h in plain.history] != [h["loss"] for h in full.history]  # the option changes the run
    # another value refuses to resume, naming the option
    other = {"loss": {"min_snr_gamma": 2.0}} if "loss" in opts else {"cfg": {"timestep_min": 0, "timestep_max": 600}}
    with pytest.raises(ValueError, match="min_snr_gamma 5.0|timestep_min 100"):
        cfg = TrainConfig(steps=6, lr=1e-3, batch_size=2, seed=7, checkpoint_dir=str(tmp_path / "d"),
                          **other.get("cfg", {}))
        train(tiny_denoiser, exs, CatLossConfig(class_word="dog", **other.get("loss", {})),
              LoraSpec(rank=4, dropout=0.1),
              cfg, resume=checkpoint_path(tmp_path / "a", 3))


def test_options_at_default_leave_the_recorded_settings_as_before(tiny_denoiser):
    """Runs from before these options recorded settings without them: at their defaults they stay out, so those
    runs' checkpoints and folders still match; set, they are recorded."""
    class A:
        name, spec = "lora", None
    s = result_settings(TrainConfig(), CatLossConfig(), A(), {}, None)
    new = {"caption_dropout", "shuffle_tags", "keep_tags", "caption_variants", "timestep_min", "timestep_max"}
    assert not new & set(s["config"]) and "min_snr_gamma" not in s["loss"] and "lr" in s["config"]
    s = result_settings(TrainConfig(timestep_max=900, caption_dropout=0.1), CatLossConfig(min_snr_gamma=5.0), A(), {},
                        None)
    assert s["config"]["timestep_max"] == 900 and "timestep_min" not in s["config"]
    assert s["loss"]["min_snr_gamma"] == "5.0"


def _examples(text):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(3)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def test_flow_denoiser_trains_with_both(text):
    from cat_train.world.unet import TINY_CONFIG, UNet

    torch.manual_seed(0)
    den = ModuleDenoiser(UNet(**TINY_CONFIG), "flow", FlowSchedule())
    r = train(den, _examples(text), CatLossConfig(class_word="dog", min_snr_gamma=5.0), LoraSpec(rank=2),
              TrainConfig(steps=2, timestep_min=100, timestep_max=900))
    assert r.steps_done == 2 and all(math.isfinite(h["loss"]) for h in r.history)
