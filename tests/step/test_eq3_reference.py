"""Eq. 3 of the CAT paper computed by hand, independently of the trainer's code paths, against `cat_objective`.

The reference shares nothing with `cat_objective` but the UNet class: the frozen model is a deep copy taken
before the LoRA exists (not the adapter switch), the adapted model is a second copy with B·A·(alpha/r) merged
into its weights by hand (not peft's forward), the noise schedule is rebuilt from SD's betas in float64, and
every mean is taken in float64.
"""
import copy

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, inject_lora, lora_layers
from cat_train.step.denoiser import ModuleDenoiser
from lora_objective import objective
from cat_train.world.unet import TINY_CONFIG, UNet

RANK, LORA_ALPHA = 4, 8.0


def _unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(**TINY_CONFIG)
    with torch.no_grad():  # ldm zero-inits output convs; random ones make every layer matter to the output
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return unet.eval()


def _abar() -> torch.Tensor:
    """SD's scaled-linear schedule, written out: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)²."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


@pytest.fixture(scope="module")
def models():
    adapted = _unet()
    frozen = copy.deepcopy(adapted)  # eps_θ: taken before any LoRA layer exists
    inject_lora(adapted, LoraSpec(rank=RANK, alpha=LORA_ALPHA, preset="attn"))
    g = torch.Generator().manual_seed(1)
    merged = copy.deepcopy(frozen)  # eps_θ' by hand: W + (alpha / r) B A in a plain UNet
    merged_modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(adapted).items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)  # peft starts B at 0: the adapter would change nothing
            merged_modules[name].weight += (LORA_ALPHA / RANK) * (b.double() @ a.double()).float()
    return frozen, adapted, merged


def _inputs(seed=0, b=3, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([5, 480, 990])[:b]  # low, middle and high noise
    c_tok = {"context": torch.randn(b, 6, 64, generator=g)}
    c_pres = {"context": torch.randn(b, 6, 64, generator=g)}
    w = torch.tensor([1.0, 0.25, 3.0])[:b]  # per-sample trigger weights (multi-concept)
    return x0, noise, t, c_tok, c_pres, w


def _by_hand(frozen, merged, x0, noise, t, c_tok, c_pres, w, alpha, prediction):
    abar = _abar()[t].view(-1, 1, 1, 1)
    sa, sb = abar.sqrt(), (1 - abar).sqrt()
    x_t = (sa * x0.double() + sb * noise.double()).float()
    target = noise.double() if prediction == "eps" else sa * noise.double() - sb * x0.double()
    with torch.no_grad():
        eps_adapted_tok = merged(x_t, t, context=c_tok["context"]).double()
        eps_adapted_pres = merged(x_t, t, context=c_pres["context"]).double()
        eps_frozen_pres = frozen(x_t, t, context=c_pres["context"]).double()
    fit = ((target - eps_adapted_tok) ** 2).flatten(1).mean(1)
    keep = ((eps_frozen_pres - eps_adapted_pres) ** 2).flatten(1).mean(1)
    return fit, keep, (fit + alpha * w.double() * keep).mean()


def test_hand_merged_lora_matches_peft_forward(models):
    """The reference's eps_θ' is the model cat_objective trains: peft's forward equals the merged copy."""
    frozen, adapted, merged = models
    x0, _, t, c_tok, _, _ = _inputs()
    with torch.no_grad():
        peft_out = adapted(x0, t, context=c_tok["context"])
        hand_out = merged(x0, t, context=c_tok["context"])
        base_out = frozen(x0, t, context=c_tok["context"])
    assert (peft_out - hand_out).abs().max() < 1e-5
    assert (peft_out - base_out).abs().max() > 1e-2  # the random B really moves the prediction


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_cat_objective_equals_eq3_by_hand(models, alpha, prediction):
    frozen, adapted, merged = models
    x0, noise, t, c_tok, c_pres, w = _inputs()
    fit, keep, loss = _by_hand(frozen, merged, x0, noise, t, c_tok, c_pres, w, alpha, prediction)
    assert keep.min() > 1e-4  # the preservation term is not trivially zero, so alpha is really tested
    terms = objective(ModuleDenoiser(adapted, prediction_type=prediction), x0, noise, t, c_tok, c_pres, alpha, w)
    # float32 passes against a float64 formula over peft's and the hand-merged model: relative, in the loss's own scale
    assert terms.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(terms.fit.double(), fit, rtol=1e-5, atol=0)
    if alpha == 0:
        assert terms.keep.eq(0).all()  # plain LoRA: no preservation pass at all
    else:
        assert torch.allclose(terms.keep.double(), keep, rtol=1e-5, atol=0)


def test_reference_tells_eps_from_v_and_alpha_apart(models):
    """The comparisons above can fail: the hand loss moves by far more than 1e-6 across alpha and prediction."""
    frozen, _, merged = models
    args = (frozen, merged, *_inputs())
    losses = [_by_hand(*args, alpha, p)[2].item() for alpha in (0.0, 0.5, 2.0) for p in ("eps", "v")]
    gaps = [abs(a - b) for i, a in enumerate(losses) for b in losses[i + 1:]]
    assert min(gaps) > 1e-4
