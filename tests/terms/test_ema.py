"""EMA of the adapter weights (TrainConfig.ema_decay / ema_start_step): the recursion, what is exported, resumes."""
import dataclasses

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, lora_layers, lora_weights
from cat_train.adapters.registry import LoraAdapter
from cat_train.training import CatLossConfig
from cat_train.training.run_folder import result_settings
from cat_train.training import TrainConfig, build_examples, checkpoint_path, train


def examples(text, n=3):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def flat(weights) -> list[torch.Tensor]:
    """A LoRA's tensors in the adapter's parameter order (each layer's down, then up): the EMA's shadow order."""
    return [t for w in weights.values() for t in (w.down, w.up)]


def run(den, exs, tmp, steps=6, **kw):
    cfg_kw = {k: kw.pop(k) for k in ("ema_decay", "ema_start_step", "save_every") if k in kw}
    cfg = TrainConfig(steps=steps, lr=3e-3, batch_size=2, seed=7, checkpoint_dir=str(tmp), lr_schedule="cosine",
                      warmup_steps=2, **cfg_kw)
    return train(den, exs, CatLossConfig(alpha=1.0, class_word="dog"), LoraSpec(rank=4, dropout=0.1), cfg, **kw)


def recording(den, into: list):
    """A step callback keeping the trained (not averaged) weights after every step."""
    return lambda info: into.append(flat(lora_weights(den.module)))


def test_shadow_is_the_hand_computed_recursion(tiny_denoiser, text, tmp_path):
    d, start = 0.8, 2
    raw: list = []
    r = run(tiny_denoiser, examples(text), tmp_path, steps=6, ema_decay=d, ema_start_step=start,
            callback=recording(tiny_denoiser, raw))
    shadow = [t.double() for t in raw[start - 1]]  # steps 1..start: a copy of the weights
    for w in raw[start:]:
        shadow = [d * s + (1 - d) * x.double() for s, x in zip(shadow, w)]
    got = flat(r.weights)
    assert len(got) == len(shadow) == len(raw[-1]) > 0
    for g, s in zip(got, shadow):
        assert g.dtype == torch.float32
        assert torch.allclose(g.double(), s, rtol=0, atol=1e-7 * max(1.0, s.abs().max().item())), (g - s).abs().max()
    moved = max((g - x).abs().max().item() for g, x in zip(got, raw[-1]))
    assert moved > 1e-4  # the result is not the last trained weights (lr 3e-3 moves them well past the tolerance)


def test_ema_leaves_training_itself_unchanged_and_decay_0_is_off(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    raw_off, raw_on = [], []
    off = run(tiny_denoiser, exs, tmp_path / "off", save_every=6, callback=recording(tiny_denoiser, raw_off))
    on = run(tiny_denoiser, exs, tmp_path / "on", save_every=6, ema_decay=0.9,
             callback=recording(tiny_denoiser, raw_on))
    assert [h["loss"] for h in off.history] == [h["loss"] for h in on.history]
    assert all(torch.equal(a, b) for ra, rb in zip(raw_off, raw_on) for a, b in zip(ra, rb))
    assert all(torch.equal(a, b) for a, b in zip(flat(off.weights), raw_off[-1]))  # off: the trained weights
    assert not all(torch.equal(a, b) for a, b in zip(flat(on.weights), raw_on[-1]))
    assert "ema" not in torch.load(checkpoint_path(tmp_path / "off", 6), weights_only=True)
    assert "ema" in torch.load(checkpoint_path(tmp_path / "on", 6), weights_only=True)


def test_off_runs_record_the_settings_earlier_versions_recorded():
    """Run folders and checkpoints of earlier versions (no ema fields) must still match a run with EMA off."""
    adapter = LoraAdapter(LoraSpec(rank=4))
    off = result_settings(TrainConfig(ema_start_step=50), CatLossConfig(), adapter, {}, "sd")
    assert not any(k.startswith("ema") for k in off["config"])
    on = result_settings(TrainConfig(ema_decay=0.99, ema_start_step=50), CatLossConfig(), adapter, {}, "sd")
    assert on["config"]["ema_decay"] == "0.99" and on["config"]["ema_start_step"] == 50


def test_step_files_and_result_are_the_shadow(tiny_denoiser, text, tmp_path):
    saved = {}
    r = run(tiny_denoiser, examples(text), tmp_path, steps=6, save_every=3, ema_decay=0.7,
            on_save=lambda step, w: saved.setdefault(step, flat(w)))
    for step in (3, 6):
        shadow = torch.load(checkpoint_path(tmp_path, step), weights_only=True)["ema"]["shadow"]
        assert all(torch.equal(a, b) for a, b in zip(saved[step], shadow)), step
    assert all(torch.equal(a, b) for a, b in zip(flat(r.weights), shadow))
    trained = torch.load(checkpoint_path(tmp_path, 6), weights_only=True)["lora"]
    trained = [t for w in trained.values() for t in (w["down"], w["up"])]
    assert not all(torch.equal(a, b) for a, b in zip(trained, shadow))  # the checkpoint resumes the trained weights
    unsaved = run(tiny_denoiser, examples(text), tmp_path / "plain", steps=6, save_every=3, ema_decay=0.7)
    # a save puts the trained weights back
    assert [h["loss"] for h in unsaved.history] == [h["loss"] for h in r.history]


def test_resume_with_ema_is_bit_exact(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    full = run(tiny_denoiser, exs, tmp_path / "a", steps=8, save_every=2, ema_decay=0.9, ema_start_step=1)
    resumed = run(tiny_denoiser, exs, tmp_path / "b", steps=8, save_every=2, ema_decay=0.9, ema_start_step=1,
                  resume=checkpoint_path(tmp_path / "a", 4))
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert all(torch.equal(a, b) for a, b in zip(flat(full.weights), flat(resumed.weights)))
    a, b = (torch.load(checkpoint_path(tmp_path / d, 8), weights_only=True) for d in "ab")
    assert all(torch.equal(x, y) for x, y in zip(a["ema"]["shadow"], b["ema"]["shadow"]))
    assert not lora_layers(tiny_denoiser.module)


@pytest.mark.parametrize("change, named", [({"ema_decay": 0.0}, "ema_decay 0.9 -> (unset)"),
                                           ({"ema_start_step": 3}, "ema_start_step 1 -> 3")])
def test_resume_with_other_ema_settings_is_refused(tiny_denoiser, text, tmp_path, change, named):
    exs = examples(text)
    run(tiny_denoiser, exs, tmp_path / "a", steps=4, save_every=2, ema_decay=0.9, ema_start_step=1)
    kw = {"ema_decay": 0.9, "ema_start_step": 1, **change}
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        run(tiny_denoiser, exs, tmp_path / "b", steps=4, resume=checkpoint_path(tmp_path / "a", 2), **kw)


def test_config_checks_and_metadata():
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_start_step must be >= 0"):
        TrainConfig(ema_start_step=-1)
    assert TrainConfig().ema.metadata() == {"cat_ema_decay": "0.0", "cat_ema_start_step": "0"}
    assert dataclasses.replace(TrainConfig(), ema_decay=0.999, ema_start_step=100).ema.metadata() == {
        "cat_ema_decay": "0.999", "cat_ema_start_step": "100"}


def test_catversion_embeddings_are_averaged_too(tmp_path):
    """The EMA acts on any plugins.Adapter's parameters: CatVersion's embeddings (train_catversion's loop settings)."""
    from cat_train.adapters import catversion as cv
    from cat_train.training import catversion as cvt
    from cat_train.world import model as wm
    from tests.adapters.test_catversion import _assert_left_as_found, _items

    den, text = wm.load_base()
    cfg = cvt.CatVersionConfig(steps=4, lr=1e-2, batch_size=2, alpha=1.0, class_word="circle", seed=5)
    r = cvt.train_catversion(den, {"text": text}, text.encode, _items(), cv.CatVersionSpec(layers=2), cfg,
                             checkpoint_dir=str(tmp_path), save_every=4, ema_decay=0.5)
    state = torch.load(checkpoint_path(tmp_path, 4), weights_only=True)
    e = r.embeddings["text"]
    got = {t.detach().numpy().tobytes() for t in (e.keys, e.values)}
    assert got == {t.numpy().tobytes() for t in state["ema"]["shadow"]}
    trained = state["catversion"]["text"]
    assert not torch.equal(e.keys, trained["keys"]) and not torch.equal(e.values, trained["values"])
    _assert_left_as_found(den, text)
