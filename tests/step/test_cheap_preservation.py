"""Cheaper preservation: the CAT term on every k-th step (keep_every) and on a random fraction of rows (keep_fraction),
α scaled so the expected loss is exact CAT's, and the skipped steps and rows costing no frozen or y pass."""
import itertools

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, adapter_parameters, inject_lora
from cat_train.training import CatLossConfig
from cat_train.step.objective import preservation_rows
from lora_objective import objective
from cat_train.training.run_folder import result_settings
from cat_train.training import TrainConfig, build_examples, checkpoint_path, train


def batch(b=4, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, hw, hw, generator=g)
    return x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (b,), generator=g), \
        {"context": torch.randn(b, 6, 64, generator=g)}, {"context": torch.randn(b, 6, 64, generator=g)}


def adapted(denoiser):
    inject_lora(denoiser.module, LoraSpec(rank=4, preset="full"))
    with torch.no_grad():
        for p in adapter_parameters(denoiser.module):
            p.normal_(0, 0.05)
    return denoiser


def examples(text, n=4):
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]
    return build_examples(items, text, CatLossConfig(class_word="dog"))


def run(denoiser, exs, tmp, steps=6, loss=None, **kw):
    cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                      checkpoint_dir=str(tmp), lr_schedule="cosine", warmup_steps=2)
    return train(denoiser, exs, loss or CatLossConfig(alpha=1.0, class_word="dog"), LoraSpec(rank=4, dropout=0.1), cfg,
                 **kw)


def counting(denoiser):
    """Wrap predict: every forward's (rows, grad enabled, output dtype, output has autograd state)."""
    calls, predict = [], denoiser.predict

    def wrapped(x, t, c):
        out = predict(x, t, c)
        calls.append((x.shape[0], torch.is_grad_enabled(), out.dtype, out.grad_fn is not None))
        return out
    denoiser.predict = wrapped
    return calls


def weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].down, b[k].down) and torch.equal(a[k].up, b[k].up) for k in a)


def test_options_at_one_are_exact_cat_bit_for_bit(tiny_denoiser):
    cfg = CatLossConfig(alpha=1.5, keep_every=1, keep_fraction=1.0)
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    assert preservation_rows(cfg, 3, 4, gen) == (1.5, None)
    assert torch.equal(gen.get_state(), before)  # no draw: exact CAT's batches, timesteps and noise are untouched
    den = adapted(tiny_denoiser)
    full = objective(den, *batch(), alpha=1.5)
    every_row = objective(den, *batch(), alpha=1.5, keep_rows=torch.arange(4))  # the subset path, all rows picked
    assert torch.equal(full.loss, every_row.loss) and torch.equal(full.keep, every_row.keep)


def test_training_with_options_at_one_equals_the_default_run(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    default = run(tiny_denoiser, exs, tmp_path / "a")
    ones = run(tiny_denoiser, exs, tmp_path / "b",
               loss=CatLossConfig(alpha=1.0, class_word="dog", keep_every=1, keep_fraction=1.0))
    thinned = run(tiny_denoiser, exs, tmp_path / "c", loss=CatLossConfig(alpha=1.0, class_word="dog", keep_every=2))
    assert weights_equal(default.weights, ones.weights)
    assert [h["loss"] for h in default.history] == [h["loss"] for h in ones.history]
    assert not weights_equal(default.weights, thinned.weights)  # the comparison can tell runs apart


def test_skipped_steps_run_no_frozen_pass_and_no_doubled_batch(tiny_denoiser, text, tmp_path):
    calls = counting(tiny_denoiser)
    run(tiny_denoiser, examples(text), tmp_path / "a", steps=4,
        loss=CatLossConfig(alpha=1.0, class_word="dog", keep_every=2))
    # steps 1 and 3 (0-based 0, 2) carry the term: frozen pass on y (2 rows, no grad) + adapted [y_T, y] (4 rows)
    assert [(rows, grad) for rows, grad, _, _ in calls] == [(2, False), (4, True), (2, True), (2, False), (4, True),
                                                            (2, True)]
    frozen = [c for c in calls if not c[1]]
    assert all(not has_graph for *_, has_graph in frozen)  # the frozen pass keeps no autograd state


def test_fraction_runs_the_frozen_and_y_passes_on_the_drawn_rows_only(tiny_denoiser):
    den = adapted(tiny_denoiser)
    calls = counting(den)
    objective(den, *batch(), alpha=2.0, keep_rows=torch.tensor([1, 3]))
    objective(den, *batch(), alpha=2.0, keep_rows=torch.tensor([], dtype=torch.long))
    assert [(rows, grad) for rows, grad, _, _ in calls] == [(2, False), (6, True), (4, True)]


def test_frozen_pass_runs_in_the_compute_dtype(tiny_denoiser):
    den = adapted(tiny_denoiser)
    calls = counting(den)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective(den, *batch(), alpha=1.0, keep_rows=torch.tensor([0, 2]))
    (rows, grad, dtype, graph), adapted_pass = calls
    assert (rows, grad, dtype, graph) == (2, False, torch.bfloat16, False)
    assert adapted_pass[:3] == (6, True, torch.bfloat16)


def test_scaled_alpha_keeps_the_expected_loss(tiny_denoiser):
    """Hand-computed: over all 2^4 row draws with p = 0.25, the p-weighted mean of the thinned loss (α/p on the drawn
    rows) is exact CAT's loss; over the k = 3 step phases, the mean of the thinned losses (α·k on one) is too."""
    den, (x0, noise, t, c_tok, c_pres) = adapted(tiny_denoiser), batch()
    alpha, p, k = 1.5, 0.25, 3
    exact = objective(den, x0, noise, t, c_tok, c_pres, alpha)
    fit, keep = exact.fit.double(), exact.keep.double()
    expected = 0.0
    for picked in itertools.product([0, 1], repeat=4):
        rows = torch.tensor([i for i, m in enumerate(picked) if m], dtype=torch.long)
        thinned = objective(den, x0, noise, t, c_tok, c_pres, alpha / p, keep_rows=rows)
        by_hand = (fit + alpha / p * torch.tensor(picked, dtype=torch.float64) * keep).mean()
        # the fixed draw, by hand; the thinned passes run other batch sizes than the exact one (other GEMM blocks)
        assert float(thinned.loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
        expected += p ** sum(picked) * (1 - p) ** (4 - sum(picked)) * float(thinned.loss.detach())
    assert expected == pytest.approx(float(exact.loss.detach()), rel=1e-5)
    phases = [preservation_rows(CatLossConfig(alpha=alpha, keep_every=k), step, 4, torch.Generator())[0]
              for step in range(k)]
    assert phases == [alpha * k, 0.0, 0.0]
    per_step = [float(objective(den, x0, noise, t, c_tok, c_pres, a).loss.detach()) for a in phases]
    assert sum(per_step) / k == pytest.approx(float(exact.loss.detach()), rel=1e-5)
    assert float(keep.mean()) > 1e-4  # the term is not vanishing, so the checks above weigh it


def test_row_draw_uses_the_runs_generator_only_on_steps_with_the_term():
    cfg = CatLossConfig(alpha=1.0, keep_every=2, keep_fraction=0.5)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert preservation_rows(cfg, 1, 4, gen) == (0.0, None) and torch.equal(gen.get_state(), state)
    alpha, rows = preservation_rows(cfg, 2, 4, gen)
    again = torch.Generator().manual_seed(0)
    assert alpha == 4.0 and torch.equal(rows,
                                        (torch.rand(4, generator=again, dtype=torch.float64) < 0.5).nonzero().flatten())


def test_resume_is_bit_exact_with_the_options_on(tiny_denoiser, text, tmp_path):
    exs = examples(text)
    loss = CatLossConfig(alpha=1.0, class_word="dog", keep_every=2, keep_fraction=0.5)
    full = run(tiny_denoiser, exs, tmp_path / "a", 8, loss=loss, save_every=3)
    resumed = run(tiny_denoiser, exs, tmp_path / "b", 8, loss=loss, resume=checkpoint_path(tmp_path / "a", 3))
    assert weights_equal(full.weights, resumed.weights)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert len({h["keep"] == 0 for h in full.history}) == 2  # some steps had the term, some did not
    with pytest.raises(ValueError, match="keep_fraction 0.5 -> 0.25"):
        run(tiny_denoiser, exs, tmp_path / "c", 8, resume=checkpoint_path(tmp_path / "a", 3),
            loss=CatLossConfig(alpha=1.0, class_word="dog", keep_every=2, keep_fraction=0.25))


def test_settings_leave_out_the_options_at_one_so_earlier_runs_still_match():
    class A:
        name, spec = "lora", None
    settings = lambda loss: result_settings(TrainConfig(), loss, A(), {}, None)["loss"]
    assert "keep_every" not in settings(CatLossConfig()) and "keep_fraction" not in settings(CatLossConfig())
    assert settings(CatLossConfig(keep_every=4))["keep_every"] == 4
    assert settings(CatLossConfig(keep_fraction=0.5))["keep_fraction"] == "0.5"


@pytest.mark.parametrize("kw, message", [
    (dict(keep_every=0), "keep_every must be a whole number >= 1"),
    (dict(keep_every=1.5), "keep_every must be a whole number >= 1"),
    (dict(keep_fraction=0.0), r"keep_fraction must be in \(0, 1\]"),
    (dict(keep_fraction=1.2), r"keep_fraction must be in \(0, 1\]"),
    (dict(keep_fraction=float("nan")), r"keep_fraction must be in \(0, 1\]"),
    (dict(alpha=0.0, keep_every=2), "alpha = 0"),
])
def test_invalid_options_say_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        CatLossConfig(**kw)
