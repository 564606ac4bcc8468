"""Validation without sampling: exact zero drift at init, the fixed points, hand-computed fit, and no effect on
training."""
import pytest
import torch

from cat_train.adapters.lora import LoraSpec, adapter_parameters, inject_lora, lora_layers
from cat_train.training import CatLossConfig
from cat_train.training import TrainConfig, build_examples, train
from cat_train.measure.validation import ValidationLog, Validator, every, read_validation_csv


def examples(text, n=3, pres=()):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, CatLossConfig(class_word="dog", preservation_prompts=pres))


def probe(text, p):
    return {k: v[0] for k, v in text([p]).items()}


def test_points_are_drawn_once_per_image_from_their_own_seed(tiny_denoiser, text):
    exs = examples(text, pres=("a dog", "a puppy"))  # 3 images x 2 preservation prompts = 6 examples
    torch.manual_seed(123)
    before = torch.get_rng_state()
    v = Validator(tiny_denoiser, exs, points=5, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert len(v.images) == 3 and [len(i.keep) for i in v.images] == [2, 2, 2]
    assert all(i.noise.shape == (5, 4, 8, 8) and i.t.shape == (5,) for i in v.images)
    again = Validator(tiny_denoiser, exs, points=5, seed=7)
    assert all(torch.equal(a.noise, b.noise) and torch.equal(a.t, b.t) for a, b in zip(v.images, again.images))
    other = Validator(tiny_denoiser, exs, points=5, seed=8)
    assert not torch.equal(v.images[0].noise, other.images[0].noise)
    with pytest.raises(ValueError, match="points per image must be >= 1"):
        Validator(tiny_denoiser, exs, points=0)


def test_keep_drift_is_exactly_zero_at_init_and_fit_is_the_hand_computed_mse(tiny_denoiser, text):
    exs = examples(text)
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))  # B = 0: adapted == frozen
    v = Validator(tiny_denoiser, exs, probes={"cat": probe(text, "a photo of a cat")}, points=3, seed=0)
    row = v(0)
    assert row["step"] == 0 and row["keep_drift"] == 0.0 and row["probe_drift"] == 0.0
    den, sq = tiny_denoiser, []
    with torch.no_grad():
        for img in v.images:
            x0 = img.latent[None].expand(3, -1, -1, -1)
            x_t = den.schedule.add_noise(x0, img.noise, img.t)
            pred = den.predict(x_t, img.t, {k: c[None].expand(3, *c.shape) for k, c in img.cond_token.items()})
            sq.append(((pred - den.schedule.target(x0, img.noise, img.t, "eps")) ** 2).flatten(1).mean(1))
    # the validator batches images 4 at a time, this recomputation one image at a time: other GEMM blocks
    assert row["fit"] == pytest.approx(float(torch.cat(sq).double().mean()), rel=1e-5) and row["fit"] > 0.1
    with torch.no_grad():
        for p in adapter_parameters(tiny_denoiser.module):
            p.normal_(0, 0.05)
    moved = v(1)
    assert moved["keep_drift"] > 1e-6 and moved["probe_drift"] > 1e-6 and moved["fit"] != row["fit"]
    assert v(1) == moved  # fixed points: the same model gives the same row


def test_validation_does_not_change_training_and_drift_grows(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    spec = LoraSpec(rank=4, dropout=0.1)  # dropout draws from the global RNG in train mode: the stream must not move
    cfg = TrainConfig(steps=6, lr=3e-3, batch_size=2, seed=5)
    lc = CatLossConfig(alpha=1.0, class_word="dog")
    was_training = tiny_denoiser.module.training
    plain = train(tiny_denoiser, exs, lc, spec, cfg)

    v = Validator(tiny_denoiser, exs, probes={"cat": probe(text, "a cat")}, points=2, seed=1)
    logged = ValidationLog(tmp_path / "validation.csv", tensorboard_dir=tmp_path / "tb")
    logged.write(v(0))  # before training: no adapter yet, the base model on both sides
    watched = train(tiny_denoiser, exs, lc, spec, cfg, callback=every(2, v, logged.write))
    logged.close()
    for n, w in plain.weights.items():
        assert torch.equal(w.down, watched.weights[n].down) and torch.equal(w.up, watched.weights[n].up), n
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in watched.history]
    assert not lora_layers(tiny_denoiser.module)  # the trainer still removed its adapter
    assert tiny_denoiser.module.training is was_training

    rows = read_validation_csv(tmp_path / "validation.csv")
    assert [r["step"] for r in rows] == [0, 2, 4, 6] and set(rows[0]) == {"step", "fit", "keep_drift", "probe_drift"}
    assert rows[0]["keep_drift"] == 0.0 and rows[-1]["keep_drift"] > 0 and rows[-1]["probe_drift"] > 0
    assert rows == logged.rows  # floats written with repr: the CSV reads back exactly
    assert not (tmp_path / "tb").exists() or any((tmp_path / "tb").iterdir())  # event files only with tensorboard

    # the check above can fail: a callback that runs the model in train mode draws dropout from the training RNG
    def careless(info):
        tiny_denoiser.predict(exs[0].latent[None], torch.tensor([10]),
                              {k: c[None] for k, c in exs[0].cond_token.items()})
    touched = train(tiny_denoiser, exs, lc, spec, cfg, callback=careless)
    assert any(not torch.equal(w.up, touched.weights[n].up) for n, w in plain.weights.items())


def test_validation_restores_modes_and_adapter_switch(tiny_denoiser, text):
    unet = tiny_denoiser.module
    inject_lora(unet, LoraSpec(rank=4))
    unet.train()
    first = next(iter(lora_layers(unet).values()))
    first._disable_adapters = True  # a user had switched one layer off
    some = next(m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    some.eval()
    Validator(tiny_denoiser, examples(text), points=1)(0)
    assert unet.training and not some.training and first._disable_adapters
    assert sum(layer._disable_adapters for layer in lora_layers(unet).values()) == 1
    assert all(p.grad is None for p in adapter_parameters(unet))


def test_every_validates_on_multiples_and_the_last_step():
    seen = []

    class Info:
        def __init__(self, step):
            self.step, self.total = step, 7
    cb = every(3, lambda s: {"step": s}, seen.append)
    for s in range(1, 8):
        cb(Info(s))
    assert [r["step"] for r in seen] == [3, 6, 7]
    with pytest.raises(ValueError, match="n >= 1"):
        every(0, None, seen.append)


def test_batching_and_buckets_do_not_change_the_numbers(tiny_denoiser, text):
    g = torch.Generator().manual_seed(4)
    items = [(torch.randn(4, 8, 8, generator=g), "a photo of sks dog", ("sks",)),
             (torch.randn(4, 8, 12, generator=g), "sks dog in a long caption about a meadow", ("sks",)),
             (torch.randn(4, 8, 8, generator=g), "sks dog asleep", ("sks",))]
    exs = build_examples(items, text, CatLossConfig(class_word="dog"))
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))
    with torch.no_grad():
        for p in adapter_parameters(tiny_denoiser.module):
            p.normal_(0, 0.05)
    probes = {"cat": probe(text, "a cat")}
    one = Validator(tiny_denoiser, exs, probes=probes, points=2, seed=3, batch_size=1)
    all_ = Validator(tiny_denoiser, exs, probes=probes, points=2, seed=3, batch_size=10)
    assert len(one.passes) == 3 and len(all_.passes) == 2  # two latent shapes never share a batch
    a, b = one(7), all_(7)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a) and a["keep_drift"] > 0
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Validator(tiny_denoiser, exs, batch_size=0)


@pytest.mark.parametrize("ptype", ["v", "flow"])
def test_fit_uses_the_model_s_own_target_and_schedule(tiny_denoiser, text, ptype):
    from cat_train.step.denoiser import FlowSchedule, ModuleDenoiser, NoiseSchedule
    sched = FlowSchedule(shift=3.0) if ptype == "flow" else NoiseSchedule.scaled_linear()
    den = ModuleDenoiser(tiny_denoiser.module, ptype, sched)
    inject_lora(den.module, LoraSpec(rank=4, preset="full"))
    v = Validator(den, examples(text), points=3, seed=2)
    if ptype == "flow":  # the schedule's own draw: continuous t = 1000 sigma inside (0, 1000)
        assert all(i.t.dtype == torch.float32 and 0 < float(i.t.min()) and float(i.t.max()) < 1000 for i in v.images)
    row = v(0)
    img = v.images[0]
    x0 = img.latent[None].expand(3, -1, -1, -1)
    want = img.noise - x0 if ptype == "flow" else sched.target(x0, img.noise, img.t, "v")
    assert torch.allclose(sched.target(x0, img.noise, img.t, ptype), want)
    with torch.no_grad():
        pred = den.predict(sched.add_noise(x0, img.noise, img.t), img.t,
                           {k: c[None].expand(3, *c.shape) for k, c in img.cond_token.items()})
    first = float(((pred - want) ** 2).flatten(1).mean(1).double().mean())
    alone = Validator(den, examples(text)[:1], points=3, seed=2)  # the first image draws the same points alone
    assert alone(0)["fit"] == pytest.approx(first, rel=1e-5)
    assert row["keep_drift"] == 0.0
