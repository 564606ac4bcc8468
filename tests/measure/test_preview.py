"""Training previews: prompts, fixed noise, the grid's layout, every prediction space, and no effect on training."""
import numpy as np
import pytest
import torch

from cat_train.adapters.lora import LoraSpec, adapter_parameters, inject_lora, lora_layers
from cat_train.step.denoiser import FlowSchedule, ModuleDenoiser, NoiseSchedule
from cat_train.training import CatLossConfig
from cat_train.measure.preview import HEADER, LABEL_W, PAD, Previewer, preview_prompts
from cat_train.training import TrainConfig, build_examples, train

CAPTION = "a photo of sks dog on grass"


def decode(z):  # the tiny UNet's 4-channel latent as a picture: enough to see that cells land where they should
    return (z[:, :3].permute(0, 2, 3, 1).tanh() + 1) / 2


def previewer(den, text, **kw):
    prompts = preview_prompts(CAPTION, ["sks"], ["a photo of dog on grass", "a photo of a cat"])
    return Previewer(den, text, prompts, ["sks"], (4, 8, 8), decode, seed=kw.pop("seed", 3), steps=kw.pop("steps", 4),
                     **kw)


def test_default_prompts_are_the_caption_with_and_without_trigger_then_preservation_prompts():
    assert preview_prompts("a sks dog, on grass", ["sks"], ["a dog, on grass", "a cat "]) == \
        ["a sks dog, on grass", "a dog, on grass",
         "a cat"]  # the stripped caption equals the first preservation prompt: once
    assert preview_prompts("zwx and sks", ["sks", "zwx"]) == ["zwx and sks", "and"]


def test_grid_is_rows_by_columns_with_the_base_row_blank_where_a_trigger_is(tiny_denoiser, text):
    pv = previewer(tiny_denoiser, text, scale=3)
    assert pv.prompts == [CAPTION, "a photo of dog on grass", "a photo of a cat"]
    assert pv.has_trigger == [True, False, False]
    pv.base()
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))
    first = pv(10)
    with torch.no_grad():
        for p in adapter_parameters(tiny_denoiser.module):
            p.normal_(0, 0.05)
    pv(20)
    cells = pv.cells()
    assert cells.shape == (3, 3, 8, 8, 3) and [label for label, _ in pv.rows] == ["base", "step 10", "step 20"]
    assert torch.isnan(cells[0, 0]).all() and not torch.isnan(cells[0, 1:]).any()
    # B = 0 at step 10: the adapted model draws what the base drew (batch 3 vs 2: equal up to GEMM rounding)
    assert torch.allclose(cells[1, 1:], cells[0, 1:], atol=1e-5)
    assert (cells[2] - cells[1]).abs().max() > 1e-3  # a changed adapter changes the pictures
    g = pv.grid()
    assert g.shape == (HEADER + 3 * (24 + PAD) + PAD, LABEL_W + 3 * (24 + PAD) + PAD, 3) and g.dtype == np.uint8
    y, x = HEADER + 2 * (24 + PAD), LABEL_W + PAD + 1 * (24 + PAD)  # row "step 20", column 1
    want = np.kron((cells[2, 1].numpy() * 255).round().astype(np.uint8), np.ones((3, 3, 1), np.uint8))
    assert np.array_equal(g[y:y + 24, x:x + 24], want)
    assert (g[HEADER:HEADER + 24, LABEL_W + PAD:LABEL_W + PAD + 24] == 200).all()  # the blank base cell
    again = pv(20)
    assert all(torch.equal(a, b) for a, b in zip(again, pv.rows[2][1]))  # fixed noise: same adapter, same images
    assert len(pv.seconds) == 4 and all(s > 0 for s in pv.seconds)
    assert all(torch.equal(a, b) for a, b in zip(first, pv.rows[1][1]))


def test_a_round_restores_modes_and_switch_and_samples_with_the_adapter_on(tiny_denoiser, text):
    unet = tiny_denoiser.module
    inject_lora(unet, LoraSpec(rank=4, preset="full"))
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.normal_(0, 0.05)
    pv = previewer(tiny_denoiser, text)
    on = pv(1)
    unet.train()
    norm = next(m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    norm.eval()
    for layer in lora_layers(unet).values():
        layer._disable_adapters = True  # switched off by whoever holds the model
    off_then_on = pv(2)
    assert all(torch.equal(a, b) for a, b in zip(on, off_then_on))  # the round switched it on for itself
    assert unet.training and not norm.training and all(layer._disable_adapters for layer in lora_layers(unet).values())
    base = pv.base()
    assert all(layer._disable_adapters for layer in lora_layers(unet).values())
    assert (base[1] - on[1]).abs().max() > 1e-3 and all(p.grad is None for p in adapter_parameters(unet))


@pytest.mark.parametrize("ptype", ["eps", "v", "flow"])
def test_previews_in_each_prediction_space(tiny_denoiser, text, ptype):
    den = ModuleDenoiser(tiny_denoiser.module, ptype,
                         FlowSchedule(shift=3.0) if ptype == "flow" else NoiseSchedule.scaled_linear())
    row = previewer(den, text, cfg=2.0)(1)
    assert len(row) == 3 and all(im.shape == (8, 8, 3) and bool(torch.isfinite(im).all()) for im in row)
    assert (row[0] - row[2]).abs().max() > 1e-4  # prompts differ, noise is shared


def test_previews_do_not_change_training(tiny_denoiser, text):
    g = torch.Generator().manual_seed(3)
    exs = build_examples([(torch.randn(4, 8, 8, generator=g), f"{CAPTION} {i}", ("sks",)) for i in range(3)], text,
                         CatLossConfig(class_word="dog"))
    spec, cfg, lc = LoraSpec(rank=4, dropout=0.1), TrainConfig(steps=5, lr=3e-3, batch_size=2, seed=2, save_every=2), \
        CatLossConfig(alpha=1.0, class_word="dog")
    plain = train(tiny_denoiser, exs, lc, spec, cfg)
    pv = previewer(tiny_denoiser, text)
    pv.base()
    saved = []
    shown = train(tiny_denoiser, exs, lc, spec, cfg, on_save=lambda step, w: saved.append(pv(step)))
    assert len(saved) == 2 and [label for label, _ in pv.rows] == ["base", "step 2", "step 4"]
    for n, w in plain.weights.items():
        assert torch.equal(w.down, shown.weights[n].down) and torch.equal(w.up, shown.weights[n].up), n
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in shown.history]
