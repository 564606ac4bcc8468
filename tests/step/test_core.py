"""The CAT objective, the adapter switch and the training loop, on a tiny SD-shaped UNet."""
import math

import pytest
import torch

from cancel import Cancelled, cancel_at
from cat_train.adapters.lora import (LoraSpec, adapter_disabled, adapter_parameters, inject_lora, lora_layers,
                                     lora_weights,
                               remove_lora)
from cat_train.step.denoiser import NoiseSchedule
from cat_train.training import CatLossConfig
from cat_train.step.objective import cat_loss
from lora_objective import objective
from cat_train.training import (TrainConfig, TrainingDiverged, TrainingOutOfMemory, build_examples, checkpoint_path,
                                lr_factor, train)


def batch(b=2, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        {"context": torch.randn(b, 6, 64, generator=g)}, {"context": torch.randn(b, 6, 64, generator=g)}


def randomize_lora(unet, scale=0.05):
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.normal_(0, scale)


def examples(text, n=3, hw=8, caption="a photo of sks dog"):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, hw, hw, generator=g), f"{caption} {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def test_cat_term_is_zero_at_init(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))
    terms = objective(tiny_denoiser, *batch(), alpha=1.0)
    assert terms.keep.abs().max() < 1e-10  # LoRA B = 0: eps_θ' == eps_θ up to batch-size GEMM rounding
    assert terms.fit.min() > 0.1
    same = torch.randn(3, 4, 8, 8)
    assert cat_loss(same, torch.zeros_like(same), same, same.clone(), alpha=2.0).keep.eq(0).all()


def test_alpha_zero_is_plain_lora_loss_and_skips_preservation(tiny_denoiser):
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4))
    randomize_lora(tiny_denoiser.module)
    x0, noise, t, c_tok, c_pres = batch()
    calls = []
    predict = tiny_denoiser.predict
    tiny_denoiser.predict = lambda x, t_, c: calls.append(x.shape[0]) or predict(x, t_, c)
    terms = objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=0.0)
    x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
    plain = (predict(x_t, t, c_tok) - noise).pow(2).mean()
    assert calls == [2]  # one adapted pass on y_T only
    # the same squares summed per sample then averaged vs in one mean: float32 sums of 512 terms in two orders
    assert torch.allclose(terms.loss, plain, rtol=1e-5, atol=0)
    calls.clear()
    cat = objective(tiny_denoiser, x0, noise, t, c_tok, c_pres, alpha=1.5)
    assert calls == [2, 4]  # one frozen pass on y (no grad), one batched adapted pass on [y_T, y]
    assert cat.keep.min() > 0 and torch.allclose(cat.loss, (cat.fit + 1.5 * cat.keep).mean())


def test_v_prediction_target():
    s = NoiseSchedule.scaled_linear()
    x0, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    a = s.alphas_cumprod[t].float().sqrt().view(-1, 1, 1, 1)
    v = s.target(x0, eps, t, "v")
    assert torch.allclose(v, a * eps - (1 - a**2).sqrt() * x0, atol=1e-6)
    x_t = s.add_noise(x0, eps, t)  # x0 is recoverable from (x_t, v): x0 = sqrt(abar) x_t - sqrt(1-abar) v
    assert torch.allclose(a * x_t - (1 - a**2).sqrt() * v, x0, atol=1e-5)


def test_only_adapter_parameters_get_gradients(tiny_denoiser):
    unet = tiny_denoiser.module
    inject_lora(unet, LoraSpec(rank=4, preset="full"))
    randomize_lora(unet)
    objective(tiny_denoiser, *batch(), alpha=1.0).loss.backward()
    adapter = {id(p) for p in adapter_parameters(unet)}
    params = dict(unet.named_parameters())
    with_grad = [n for n, p in params.items() if p.grad is not None]
    assert len(with_grad) == len(adapter) and all(id(params[n]) in adapter for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for p in adapter_parameters(unet))


def test_disabled_adapter_reproduces_frozen_output_exactly(tiny_denoiser):
    unet = tiny_denoiser.module
    x0, _, t, c, _ = batch()
    before = tiny_denoiser.predict(x0, t, c)
    inject_lora(unet, LoraSpec(rank=4, preset="full"))
    randomize_lora(unet)
    adapted = tiny_denoiser.predict(x0, t, c)
    with adapter_disabled(unet):
        frozen = tiny_denoiser.predict(x0, t, c)
    assert torch.equal(frozen, before)
    assert (adapted - before).abs().max() > 1e-3


def test_lora_delta_changes_weights_by_the_expected_amount(tiny_denoiser):
    unet = tiny_denoiser.module
    inject_lora(unet, LoraSpec(rank=4, alpha=8))
    randomize_lora(unet)
    name, w = next(iter(lora_weights(unet).items()))
    layer = unet.get_submodule(name)
    x = torch.randn(5, layer.get_base_layer().in_features)
    expected = layer.get_base_layer()(x) + x @ w.delta().T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(w.delta(), 2.0 * w.up @ w.down)  # alpha / rank = 8 / 4


def test_training_and_removal_leave_base_weights_bit_identical(tiny_denoiser, text):
    unet = tiny_denoiser.module
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    result = train(tiny_denoiser, examples(text), CatLossConfig(alpha=1.0, class_word="dog"), LoraSpec(rank=4),
                   TrainConfig(steps=3, lr=1e-3))
    after = unet.state_dict()
    assert not lora_layers(unet)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(w.up.abs().sum() > 0 for w in result.weights.values())


def test_loss_falls_when_overfitting_three_images(tiny_denoiser, text):
    exs = examples(text)
    x0 = torch.stack([e.latent for e in exs])
    c = {"context": torch.stack([e.cond_token["context"] for e in exs])}
    g = torch.Generator().manual_seed(9)
    noise, t = torch.randn(x0.shape, generator=g), torch.tensor([200, 500, 800])

    def fit():
        with torch.no_grad():
            return objective(tiny_denoiser, x0, noise, t, c, c, alpha=0.0).loss.item()

    inject_lora(tiny_denoiser.module, LoraSpec(rank=8))
    start = fit()
    remove_lora(tiny_denoiser.module)
    train(tiny_denoiser, exs, CatLossConfig(alpha=0.0), LoraSpec(rank=8), TrainConfig(steps=60, lr=3e-3, batch_size=3),
          keep_adapter=True)
    assert fit() < 0.8 * start


def test_cat_keeps_tokenless_predictions_closer_than_plain_lora(tiny_denoiser, text):
    exs = examples(text)
    x0, noise, t, _, _ = batch(3, seed=5)
    c_pres = {"context": torch.stack([e.cond_pres["context"] for e in exs])}
    drift = {}
    for alpha in (0.0, 4.0):
        train(tiny_denoiser, exs, CatLossConfig(alpha=alpha, class_word="dog"), LoraSpec(rank=8),
              TrainConfig(steps=40, lr=3e-3, batch_size=3, seed=1), keep_adapter=True)
        x_t = tiny_denoiser.schedule.add_noise(x0, noise, t)
        with torch.no_grad():
            adapted = tiny_denoiser.predict(x_t, t, c_pres)
            with adapter_disabled(tiny_denoiser.module):
                frozen = tiny_denoiser.predict(x_t, t, c_pres)
        drift[alpha] = (adapted - frozen).pow(2).mean().item()
        remove_lora(tiny_denoiser.module)
    assert drift[4.0] < 0.5 * drift[0.0], drift


def run(denoiser, exs, tmp, steps, **kw):
    cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                      checkpoint_dir=str(tmp), lr_schedule="cosine", warmup_steps=2)
    return train(denoiser, exs, CatLossConfig(alpha=1.0, class_word="dog"), LoraSpec(rank=4, dropout=0.1), cfg, **kw)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up), k


def test_resume_equals_uninterrupted_bit_for_bit(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    full = run(tiny_denoiser, exs, tmp_path / "a", 8, save_every=2)
    resumed = run(tiny_denoiser, exs, tmp_path / "c", 8, resume=checkpoint_path(tmp_path / "a", 4))
    assert_same_weights(full.weights, resumed.weights)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_checkpoints_from_before_adapter_kinds_still_resume_exactly(tiny_denoiser, text, tmp_path):
    """Format-1 files written before checkpoints named their adapter kind (no "adapter" key) resume as LoRA runs."""
    exs = examples(text)
    full = run(tiny_denoiser, exs, tmp_path / "a", 8, save_every=4)
    state = torch.load(checkpoint_path(tmp_path / "a", 4), weights_only=True)
    assert state.pop("adapter") == "lora" and {"lora", "spec"} <= set(state)
    torch.save(state, tmp_path / "old.pt")
    resumed = run(tiny_denoiser, exs, tmp_path / "b", 8, resume=tmp_path / "old.pt")
    assert_same_weights(full.weights, resumed.weights)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_cancel_keeps_a_checkpoint_that_resumes_exactly(tiny_denoiser, text, tmp_path):
    exs = examples(text)

    with pytest.raises(Cancelled):
        run(tiny_denoiser, exs, tmp_path / "x", 8, callback=cancel_at(3))
    assert not lora_layers(tiny_denoiser.module)
    ckpt = checkpoint_path(tmp_path / "x", 3)
    assert ckpt.exists()
    resumed = run(tiny_denoiser, exs, tmp_path / "y", 8, resume=ckpt)
    full = run(tiny_denoiser, exs, tmp_path / "z", 8)
    assert_same_weights(full.weights, resumed.weights)


def test_nan_loss_stops_and_keeps_last_good_state(tiny_denoiser, text, tmp_path):
    predict, calls = tiny_denoiser.predict, []

    def poisoned(x, t, c):
        calls.append(1)
        out = predict(x, t, c)
        return out * float("nan") if len(calls) > 2 * 4 else out  # alpha > 0: 2 predict calls a step; step 5 goes bad

    tiny_denoiser.predict = poisoned
    with pytest.raises(TrainingDiverged, match="step 5") as err:
        run(tiny_denoiser, examples(text), tmp_path, 10)
    assert err.value.step == 5 and err.value.checkpoint == checkpoint_path(tmp_path, 4)
    state = torch.load(err.value.checkpoint, weights_only=True)
    assert state["step"] == 4 and all(math.isfinite(h["loss"]) for h in state["history"])


def test_multi_token_weights_and_prompts(text):
    items = [(torch.zeros(4, 8, 8), "a photo of sks dog", ("sks",)),
             (torch.zeros(4, 8, 8), "zwx cat on a sofa", ("zwx",))]
    cfg = CatLossConfig(alpha=1.0, preservation="strip", token_weights={"sks": 2.0, "zwx": 0.5})
    exs = build_examples(items, text, cfg)
    calls = list(text.calls)
    assert [e.weight for e in exs] == [2.0, 0.5]
    assert torch.equal(exs[1].cond_pres["context"], text(["cat on a sofa"])["context"][0])
    encoded = [p for call in calls for p in call]  # each distinct prompt once, one per call (no cross-padding)
    assert sorted(encoded) == sorted({"a photo of sks dog", "zwx cat on a sofa", "a photo of dog", "cat on a sofa"})
    assert all(len(call) == 1 for call in calls)


def test_per_trigger_class_words_and_preservation_list(text):
    items = [(torch.zeros(4, 8, 8), "a photo of sks dog", ("sks",)),
             (torch.zeros(4, 8, 8), "zwx cat on a sofa", ("zwx",))]
    exs = build_examples(items, text, CatLossConfig(alpha=1.0, class_word="sks=dog, zwx=cat"))
    assert torch.equal(exs[0].cond_pres["context"], text(["a photo of dog"])["context"][0])
    assert torch.equal(exs[1].cond_pres["context"], text(["cat on a sofa"])["context"][0])  # not 'dog cat on a sofa'
    with pytest.raises(ValueError, match="trigger 'zwx' has no class word.*zwx=<word>"):
        build_examples(items, text, CatLossConfig(alpha=1.0, class_word="sks=dog"))
    with pytest.raises(ValueError, match="class words entry 2 .*'sks=dog'"):
        CatLossConfig(class_word="sks=dog\nzwx")
    with pytest.raises(ValueError, match="class word of trigger 'toy' is the trigger itself"):
        build_examples([(torch.zeros(4, 8, 8), "a toy", ("toy",))], text, CatLossConfig(class_word="toy"))

    ys = ["a photo of a dog", "a photo of a cat", "a photo of a bird"]
    exs = build_examples(items, text,
                         CatLossConfig(alpha=1.0, class_word="dog", preservation_prompts=tuple(ys) + ("  ",)))
    assert len(exs) == 6  # every image with every listed y, in turn
    for i, e in enumerate(exs):
        assert torch.equal(e.cond_pres["context"], text([ys[i % 3]])["context"][0])
        assert torch.equal(e.cond_token["context"], text([items[i // 3][1]])["context"][0])


def test_long_caption_leaves_short_captions_conditioning_unchanged():
    """ComfyUI's rule: conditionings of 77 and 154 tokens batch as [c; c] and c2, never c padded with its last row."""
    g = torch.Generator().manual_seed(0)
    enc = {"short": torch.randn(77, 8, generator=g), "long": torch.randn(154, 8, generator=g)}
    text = lambda ps: {"context": torch.stack([enc[p] for p in ps])}
    alone = build_examples([(torch.zeros(4, 8, 8), "short", ())], text, CatLossConfig(alpha=0.0, preservation="strip"))
    mixed = build_examples([(torch.zeros(4, 8, 8), "short", ()), (torch.zeros(4, 8, 8), "long", ())], text,
                           CatLossConfig(alpha=0.0, preservation="strip"))
    assert torch.equal(mixed[0].cond_token["context"], alone[0].cond_token["context"])
    assert mixed[0].cond_token["context"].shape[0] == 77
    from cat_train.training.batch import collate
    _, c_tok, _, _ = collate(mixed, [0, 1], torch.device("cpu"), torch.float32)
    assert torch.equal(c_tok["context"][0], enc["short"].repeat(2, 1)) and torch.equal(c_tok["context"][1], enc["long"])
    # cross-attention cannot tell a sequence from itself repeated: the padded row predicts what it did alone
    q = torch.randn(1, 5, 8, generator=g)
    once = torch.nn.functional.scaled_dot_product_attention(q, enc["short"][None], enc["short"][None])
    twice = torch.nn.functional.scaled_dot_product_attention(q, c_tok["context"][:1], c_tok["context"][:1])
    torch.testing.assert_close(once, twice, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_denoiser):
    unet = tiny_denoiser.module
    inject_lora(unet, LoraSpec(rank=4))
    randomize_lora(unet)
    unet.train()
    grads = []
    for on in (False, True):
        unet.gradient_checkpointing = on
        unet.zero_grad()
        objective(tiny_denoiser, *batch(), alpha=1.0).loss.backward()
        grads.append([p.grad.clone() for p in adapter_parameters(unet)])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(steps=10, warmup_steps=2, lr_schedule="cosine")
    f = [lr_factor(cfg, s) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and abs(f[6] - 0.5) < 1e-9 and f[9] < 0.05


@pytest.mark.parametrize("make, match", [
    (lambda: CatLossConfig(alpha=-0.5), "alpha must be >= 0"),
    (lambda: CatLossConfig(alpha=float("nan")), "alpha must be >= 0"),
    (lambda: LoraSpec(rank=0), "rank must be >= 1"),
    (lambda: TrainConfig(steps=0), "steps must be >= 1"),
    (lambda: TrainConfig(lr=0), "learning rate must be a finite number > 0"),
    (lambda: CatLossConfig(preservation="nope"), "'empty', 'strip' or 'class'"),
    (lambda: LoraSpec(preset="everything"), "unknown target preset"),
])
def test_bad_settings_say_what_and_how(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_class_mode_needs_a_class_word(text):
    with pytest.raises(ValueError, match="needs a class word"):
        build_examples([(torch.zeros(4, 8, 8), "sks", ("sks",))], text, CatLossConfig(preservation="class"))


def test_empty_dataset_is_refused(tiny_denoiser):
    with pytest.raises(ValueError, match="dataset is empty"):
        train(tiny_denoiser, [], CatLossConfig(), LoraSpec(), TrainConfig(steps=1))


def test_out_of_memory_names_the_knobs_and_keeps_a_checkpoint(tiny_denoiser, text, tmp_path):
    predict, calls = tiny_denoiser.predict, []

    def oom_on_step_3(x, t, c):
        calls.append(1)
        if len(calls) > 2 * 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(x, t, c)

    tiny_denoiser.predict = oom_on_step_3
    with pytest.raises(TrainingOutOfMemory, match="at step 3.*batch_size.*gradient_checkpointing.*bf16"):
        run(tiny_denoiser, examples(text), tmp_path, 10)
    assert checkpoint_path(tmp_path, 2).exists() and not lora_layers(tiny_denoiser.module)
