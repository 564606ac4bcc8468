"""Flow matching in the core (no ComfyUI): the schedule SD3/Flux are trained with, and CAT on a flow denoiser."""
import math

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, inject_lora
from cat_train.step.denoiser import FlowSchedule, ModuleDenoiser, NoiseSchedule, time_shift
from cat_train.training import CatLossConfig
from lora_objective import objective
from cat_train.training import Example, TrainConfig, train
from cat_train.world.unet import TINY_CONFIG, UNet


def test_noising_and_velocity_target_recover_x0_and_eps():
    s = FlowSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 250.0, 1000.0])  # sigma 0, 0.25, 1
    x_t = s.add_noise(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = s.target(x0, eps, t, "flow")
    assert torch.equal(v, eps - x0)
    sigma = (t / 1000).view(-1, 1, 1, 1)
    # ComfyUI's CONST rule denoised = x - sigma * v gives x0 back; x + (1 - sigma) * v gives the noise
    torch.testing.assert_close(x_t - sigma * v, x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(x_t + (1 - sigma) * v, eps, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="velocity predictions.*'eps'"):
        s.target(x0, eps, t, "eps")


def test_logit_normal_sampling_statistics():
    t = FlowSchedule().sample_t(40000, torch.Generator().manual_seed(1))
    sigma = t.double() / 1000
    logit = torch.log(sigma / (1 - sigma))
    assert abs(float(logit.mean())) < 0.02 and abs(float(logit.std()) - 1) < 0.02  # rf/lognorm(0, 1)
    t2 = FlowSchedule(logit_mean=-0.5, logit_std=0.5).sample_t(40000, torch.Generator().manual_seed(1))
    l2 = torch.logit(t2.double() / 1000)
    assert abs(float(l2.mean()) + 0.5) < 0.02 and abs(float(l2.std()) - 0.5) < 0.02
    u = FlowSchedule(sampling="uniform").sample_t(40000, torch.Generator().manual_seed(1)).double() / 1000
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1  # never a pure image or pure noise


def test_shift_moves_sigma_toward_noise_as_sd3_and_flux_define_it():
    g = lambda: torch.Generator().manual_seed(2)
    plain = FlowSchedule().sample_t(20001, g()).double() / 1000
    shifted = FlowSchedule(shift=3.0).sample_t(20001, g()).double() / 1000
    # the same draws, mapped by sigma' = 3 s / (1 + 2 s) (monotone): the median 0.5 goes to 0.75
    torch.testing.assert_close(shifted, time_shift(3.0, plain).clamp(1e-4, 1 - 1e-4), atol=1e-6, rtol=0)
    assert abs(float(shifted.median()) - 0.75) < 0.01 and abs(float(plain.median()) - 0.5) < 0.01
    # Flux's exp(mu) / (exp(mu) + 1/s - 1) is the same map with shift exp(mu)
    s = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    mu = 1.15
    torch.testing.assert_close(time_shift(math.exp(mu), s), math.exp(mu) / (math.exp(mu) + (1 / s - 1)))


def test_draws_are_reproducible_and_options_are_checked():
    a = FlowSchedule(shift=3.0).sample_t(8, torch.Generator().manual_seed(5))
    b = FlowSchedule(shift=3.0).sample_t(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float32
    for kw, msg in [({"shift": 0}, "shift must be > 0"), ({"sampling": "cosmap"}, "'logit_normal' or 'uniform'"),
                    ({"logit_std": 0}, "logit_std must be > 0")]:
        with pytest.raises(ValueError, match=msg):
            FlowSchedule(**kw)
    # integer-timestep code (APT's bins, the memory probe's mid step) reads the continuous t unchanged
    assert FlowSchedule().num_timesteps == 1000 and float(FlowSchedule().sigma(torch.tensor([500]))) == 0.5


def test_eps_schedule_untouched():
    s = NoiseSchedule.scaled_linear()
    x0, eps, t = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([999])
    assert torch.equal(s.target(x0, eps, t, "eps"), eps)


def _flow_denoiser(seed=0):
    torch.manual_seed(seed)
    unet = UNet(**TINY_CONFIG)
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return ModuleDenoiser(unet, "flow", FlowSchedule(shift=3.0))


def test_cat_term_zero_at_init_and_flow_target_used():
    den = _flow_denoiser()
    inject_lora(den.module, LoraSpec(rank=4))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = den.schedule.sample_t(2, g)
    c_tok, c_pres = {"context": torch.randn(2, 6, 64, generator=g)}, {"context": torch.randn(2, 6, 64, generator=g)}
    terms = objective(den, x0, noise, t, c_tok, c_pres, alpha=1.0)
    assert float(terms.keep.abs().max()) < 1e-10
    with torch.no_grad():
        pred = den.predict(den.schedule.add_noise(x0, noise, t), t, c_tok)
    torch.testing.assert_close(terms.fit, (pred - (noise - x0)).pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_flow_training_overfits_three_latents(alpha):
    den = _flow_denoiser(1)
    g = torch.Generator().manual_seed(3)
    ctx = lambda: {"context": torch.randn(6, 64, generator=g)}
    exs = [Example(torch.randn(4, 8, 8, generator=g), ctx(), ctx()) for _ in range(3)]
    before = {k: v.clone() for k, v in den.module.state_dict().items()}
    res = train(den, exs, CatLossConfig(alpha=alpha), LoraSpec(rank=8, alpha=8.0, preset="full"),
                TrainConfig(steps=80, lr=1e-2, batch_size=3, seed=0))
    first = sum(h["fit"] for h in res.history[:10]) / 10
    last = sum(h["fit"] for h in res.history[-10:]) / 10
    assert last < 0.8 * first, (first, last)  # the velocity fit falls
    assert res.history[0]["keep"] < 1e-10
    if alpha:
        assert res.history[-1]["keep"] > 0
    else:
        assert all(h["keep"] == 0 for h in res.history)
    after = den.module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
