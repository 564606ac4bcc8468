"""Caption dropout and tag shuffling: caption rows built once, picked per draw from the run's generator."""
import math
import zlib

import pytest
import torch

from cat_train.adapters.lora import LoraSpec
from cat_train.data.captions import shuffled, tags
from cat_train.step.denoiser import NoiseSchedule
from cat_train.training import CatLossConfig
from cat_train.data.prompts import preservation_prompt
from cat_train.training import BatchSampler, TrainConfig, build_examples, checkpoint_path, train

CAPTION = "sks dog, red collar, on grass, sunny, side view, close-up"


def items(n=3):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 8, 8, generator=g), f"{CAPTION}, pose {i}", ("sks",)) for i in range(n)]


def build(text, **opts):
    return build_examples(items(), text, CatLossConfig(class_word="dog"), cfg=TrainConfig(**opts))


def test_shuffle_keeps_the_first_n_tags_and_permutes_the_rest():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        s = shuffled(CAPTION, 2, g)
        parts = tags(s)
        assert parts[:2] == ["sks dog", "red collar"] and sorted(parts) == sorted(tags(CAPTION))
        seen.add(tuple(parts[2:]))
    assert len(seen) > 15  # 4 tags after the kept two: 24 orders, most of them met in 200 draws
    assert shuffled("a photo of sks dog", 0, g) == "a photo of sks dog"  # one tag: nothing to move


class WholePromptText:
    """A context per whole prompt (the toy encoder sees only 6 tokens, so shuffles past them would look alike)."""

    def __init__(self):
        self.prompts = {}

    def __call__(self, prompts):
        g = torch.Generator().manual_seed(zlib.crc32(prompts[0].encode()))
        ctx = torch.randn(1, 6, 64, generator=g)
        self.prompts[ctx.numpy().tobytes()] = prompts[0]
        return {"context": ctx}


def test_y_is_built_from_the_shuffled_y_t():
    text = WholePromptText()
    exs = build(text, shuffle_tags=True, keep_tags=1, caption_variants=4)
    rows = [e for e in exs if not e.drawn]
    assert len(exs) == 3 + 3 * 4 and len(rows) == 12 and all(e.captions is not None for e in exs if e.drawn)
    by_cond = text.prompts
    shuffles = set()
    for r in rows:
        y_t = by_cond[r.cond_token["context"][None].numpy().tobytes()]
        y = by_cond[r.cond_pres["context"][None].numpy().tobytes()]
        assert tags(y_t)[0] == "sks dog" and set(tags(y_t)) - {f"pose {i}" for i in range(3)} == set(tags(CAPTION))
        assert y == preservation_prompt(y_t, ("sks",), "class", "dog")  # 'dog, ...' in the same shuffled order
        shuffles.add(y_t)
    assert len(shuffles) > 6  # the variants differ


def test_dropout_rate_gives_p_of_draws_on_the_empty_caption_with_keep_weight_0(text):
    p = 0.2
    exs = build(text, caption_dropout=p)
    empty = text([""])["context"][0]
    dropped = [i for i, e in enumerate(exs) if not e.drawn]
    assert len(dropped) == 3 and all(exs[i].weight == 0.0 and torch.equal(exs[i].cond_token["context"], empty)
                                     and torch.equal(exs[i].cond_pres["context"], empty) for i in dropped)
    sampler, g, n, hits = BatchSampler(exs, 2), torch.Generator().manual_seed(1), 0, 0
    for _ in range(5000):
        idx, _, _ = sampler.draw_batch(g, NoiseSchedule.scaled_linear())
        n += len(idx)
        hits += sum(i in dropped for i in idx)
        assert all(exs[i].weight == (0.0 if i in dropped else 1.0) for i in idx)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(hits / n - p) < 4 * sd, (hits / n, sd)  # 10000 draws: 0.2 +- 0.016


def test_options_off_build_and_draw_exactly_as_before(text):
    plain = build_examples(items(), text, CatLossConfig(class_word="dog"))
    off = build(text)
    assert len(plain) == len(off) == 3 and all(e.captions is None and e.drawn for e in off)
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for _ in range(5):
        x, y = BatchSampler(plain, 2).draw_batch(a, NoiseSchedule.scaled_linear()), \
            BatchSampler(off, 2).draw_batch(b, NoiseSchedule.scaled_linear())
        assert x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])


def test_options_set_but_examples_built_without_them_is_an_error(tiny_denoiser, text):
    plain = build_examples(items(), text, CatLossConfig(class_word="dog"))
    with pytest.raises(ValueError, match="build_examples\\(..., cfg=the TrainConfig\\)"):
        train(tiny_denoiser, plain, CatLossConfig(class_word="dog"), LoraSpec(rank=2),
              TrainConfig(steps=1, shuffle_tags=True))


def test_training_uses_the_rows_and_resumes_bit_exact(tiny_denoiser, text, tmp_path):
    opts = dict(caption_dropout=0.3, shuffle_tags=True, keep_tags=1, caption_variants=3)
    exs = build(text, **opts)
    used = []

    class Spy(BatchSampler):
        def draw_batch(self, gen, schedule):
            out = super().draw_batch(gen, schedule)
            used.extend(out[0])
            return out

    def run(folder, steps, **kw):
        cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, seed=7, checkpoint_dir=str(folder),
                          save_every=kw.pop("save_every", 0), **opts)
        return train(tiny_denoiser, exs, CatLossConfig(class_word="dog"), LoraSpec(rank=4, dropout=0.1), cfg, **kw)
    full = run(tmp_path / "a", 8, save_every=4, sampler=Spy(exs, 2))
    assert used and all(not exs[i].drawn for i in used)  # every step trains a shuffled or a dropped caption
    resumed = run(tmp_path / "b", 8, resume=checkpoint_path(tmp_path / "a", 4))
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    for k in full.weights:
        assert torch.equal(full.weights[k].up, resumed.weights[k].up)
        assert torch.equal(full.weights[k].down, resumed.weights[k].down)
    with pytest.raises(ValueError, match="caption_dropout 0.3 -> 0.1"):
        cfg = TrainConfig(steps=8, lr=1e-3, batch_size=2, seed=7, **{**opts, "caption_dropout": 0.1})
        train(tiny_denoiser, build(text, **{**opts, "caption_dropout": 0.1}), CatLossConfig(class_word="dog"),
              LoraSpec(rank=4, dropout=0.1), cfg, resume=checkpoint_path(tmp_path / "a", 4))


def test_dropout_must_be_below_one():
    with pytest.raises(ValueError, match="caption_dropout must be in \\[0, 1\\)"):
        TrainConfig(caption_dropout=1.0)
