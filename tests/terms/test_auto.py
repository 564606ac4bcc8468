"""Auto preservation: probe prompts per image, the worst probes above the threshold added (and nothing else), the
batch's y taking turns over the kept prompts, bit-exact resume with the added set, metadata and the loop's hooks."""
import json

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, inject_lora, lora_layers
from cat_train.terms.auto import AutoPreservation, added_probes
from cat_train.terms.auto_config import COMMON_SUBJECTS, AutoPreservationConfig, image_probes, probe_words
from cat_train.training import CatLossConfig
from cat_train.terms import registry
from cat_train.training import TrainConfig, build_examples, checkpoint_path, train

PROBES = ("cat", "wolf", "fox", "car")


def items(n=3):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(n)]


def loss_cfg(**auto):
    kw = dict(every=2, probes=PROBES, top_k=2, threshold=0.01, points=3) | auto
    return CatLossConfig(alpha=1.0, class_word="dog", auto=AutoPreservationConfig(**kw))


class InjectedDrift:
    """The tiny denoiser with a known drift per probe: while the LoRA is on, rows conditioned on probe p's prompt
    get `offset[p]` added, so (LoRA B = 0) that probe's keep drift is exactly offset[p]²."""

    def __init__(self, den, contexts: dict[str, torch.Tensor], offset: dict[str, float]):
        self.den, self.contexts, self.offset = den, contexts, offset
        self.module, self.schedule, self.prediction_type = den.module, den.schedule, den.prediction_type

    def predict(self, x_t, t, cond):
        out = den_out = self.den.predict(x_t, t, cond)
        if not any(not layer._disable_adapters for layer in lora_layers(self.module).values()):
            return den_out
        shift = torch.zeros(len(out))
        for r, ctx in enumerate(cond["context"]):
            for p, c in self.contexts.items():
                if ctx.shape == c.shape and torch.equal(ctx, c.to(ctx)):
                    shift[r] = self.offset[p]
        return out + shift.to(out)[:, None, None, None]


def test_probe_prompts_replace_the_class_word_in_each_image_s_y(text):
    # its own word is no probe
    assert image_probes("a photo of dog on a beach", ["dog"], ["cat", "teddy bear", "dog"]) == {
        "cat": "a photo of cat on a beach", "teddy bear": "a photo of teddy bear on a beach"}
    # whole words only; none: the probe alone
    assert image_probes("a photo of hotdog", ["dog"], ["cat"]) == {"cat": "cat"}
    assert image_probes("", [], ["cat"]) == {"cat": "cat"}  # empty preservation
    exs = build_examples(items(), text, loss_cfg())
    assert list(exs[0].probes) == list(PROBES)
    assert all(e.probes["cat"]["context"].equal(text(["a photo of cat " + str(i)])["context"][0])
               for i, e in enumerate(exs))
    assert build_examples(items(), text, CatLossConfig(alpha=1.0, class_word="dog"))[0].probes == {}  # off: no probes
    # dataset: the other class words of a multi-concept set; common: the shipped list
    multi = CatLossConfig(alpha=1.0, class_word="sks=dog, zwx=cat",
                          auto=AutoPreservationConfig(every=1, source="dataset"))
    rows = [(torch.zeros(4, 8, 8), "a photo of sks", ("sks",)), (torch.zeros(4, 8, 8), "zwx on a sofa", ("zwx",))]
    a, b = build_examples(rows, text, multi)
    assert list(a.probes) == ["cat"] and list(b.probes) == ["dog"]
    assert probe_words(AutoPreservationConfig(source="common"), "dog") == COMMON_SUBJECTS and len(COMMON_SUBJECTS) == 34
    with pytest.raises(ValueError, match="two or more class words"):
        probe_words(AutoPreservationConfig(source="dataset"), "dog")
    with pytest.raises(ValueError, match="source `list` needs probes"):
        AutoPreservationConfig(every=5)
    with pytest.raises(ValueError, match="alpha = 0"):
        CatLossConfig(alpha=0.0, class_word="dog", auto=AutoPreservationConfig(every=5, probes=("cat",)))


def _term(tiny_denoiser, text, offset, **auto):
    lc = loss_cfg(**auto)
    exs = build_examples(items(), text, lc)
    if not lora_layers(tiny_denoiser.module):
        inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))  # B = 0: only the injected drift remains
    contexts = {p: c["context"] for p, c in exs[0].probes.items()}
    term = AutoPreservation(InjectedDrift(tiny_denoiser, contexts, offset), lc.auto)
    term.start(exs)
    return term, exs


def test_the_probe_with_the_largest_injected_drift_is_added_and_nothing_below_the_threshold(tiny_denoiser, text):
    # images=1: only image 0's points are measured, so each probe's drift is exactly its offset²
    term, _ = _term(tiny_denoiser, text, {"cat": 0.15, "wolf": 0.3, "fox": 0.06, "car": 0.0}, top_k=3, images=1)
    term.end_of_step(1)  # not a multiple of every=2: nothing measured
    assert term.measured == 0 and term.added == []
    term.end_of_step(2)
    assert term.drift == pytest.approx({"wolf": 0.09, "cat": 0.0225, "fox": 0.0036, "car": 0.0}, abs=1e-6)
    # worst first; fox (0.0036) and car (0) are under the threshold 0.01, so the budget of 3 is not filled
    assert [(p, s) for p, s, _ in term.added] == [("wolf", 2), ("cat", 2)]
    term.end_of_step(4)
    assert [p for p, _, _ in term.added] == ["wolf", "cat"]  # still nothing new above the threshold
    # the budget: top_k = 1 adds only the worst
    term1, _ = _term(tiny_denoiser, text, {"cat": 0.15, "wolf": 0.3, "fox": 0.06, "car": 0.0}, top_k=1, images=1)
    term1.end_of_step(2)
    assert [p for p, _, _ in term1.added] == ["wolf"]
    report = term.report()
    assert report["auto_added"] == [["wolf", 2, pytest.approx(0.09, abs=1e-6)],
                                    ["cat", 2, pytest.approx(0.0225, abs=1e-6)]]


def test_nothing_is_added_while_every_drift_is_at_or_below_the_threshold(tiny_denoiser, text):
    term, _ = _term(tiny_denoiser, text, {"cat": 0.1, "wolf": 0.05, "fox": 0.0, "car": 0.0}, threshold=0.01, images=1)
    term.end_of_step(2)
    assert term.drift["cat"] == pytest.approx(0.01, abs=1e-6) and term.added == []  # 0.1² = threshold: not above it


def test_added_probes_take_turns_with_the_own_preservation_prompt(tiny_denoiser, text):
    term, exs = _term(tiny_denoiser, text, {"cat": 0.3, "wolf": 0.2, "fox": 0.0, "car": 0.0}, images=1)
    own = [exs[i].cond_pres for i in (0, 1)]
    gen = torch.Generator().manual_seed(0)
    assert term.preservation([0, 1], own, gen) is own  # nothing added: the batch is untouched
    term.end_of_step(2)
    got = [term.preservation([0, 1], [exs[0].cond_pres, exs[1].cond_pres], gen) for _ in range(3)]
    flat = [c for batch in got for c in batch]
    # each sample in turn: own y, then the probes in the order added (cat, wolf), each image its own prompts
    expect = [exs[0].cond_pres, exs[1].probes["cat"], exs[0].probes["wolf"], exs[1].cond_pres, exs[0].probes["cat"],
              exs[1].probes["wolf"]]
    assert all(a is b for a, b in zip(flat, expect))
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # draws nothing


def _run(den, exs, lc, tmp, **kw):
    cfg = TrainConfig(steps=8, lr=3e-2, batch_size=2, seed=7, save_every=kw.pop("save_every", 0),
                      checkpoint_dir=str(tmp))
    return train(den, exs, lc, LoraSpec(rank=4, preset="full"), cfg, **kw)


def test_in_training_probes_are_added_and_resume_restores_the_set_bit_exactly(tiny_denoiser, text, tmp_path):
    lc = loss_cfg(every=3, threshold=0.0, top_k=2, images=2)
    exs = build_examples(items(), text, lc)
    infos = []
    full = _run(tiny_denoiser, exs, lc, tmp_path / "a", save_every=2, callback=infos.append)
    added = full.history[-1]["auto_added"]
    # the two worst, at the first check
    assert [s for _, s, _ in added] == [3, 3] and len({p for p, _, _ in added}) == 2
    assert infos[2].reports["auto"]["measured"] == 3 and infos[1].reports["auto"]["auto_added"] == []
    drift3 = infos[2].reports["auto"]["drift"]
    assert [p for p, _, _ in added] == sorted(drift3, key=lambda p: -drift3[p])[:2]
    state = torch.load(checkpoint_path(tmp_path / "a", 4), weights_only=True)
    assert [p for p, _, _ in state["auto"]["added"]] == [p for p, _, _ in added]
    resumed = _run(tiny_denoiser, exs, lc, tmp_path / "b", resume=checkpoint_path(tmp_path / "a", 4))
    for k in full.weights:
        assert torch.equal(full.weights[k].down, resumed.weights[k].down)
        assert torch.equal(full.weights[k].up, resumed.weights[k].up)
    assert full.history == resumed.history
    assert added_probes(resumed.history) == [p for p, _, _ in added]
    # before the first addition, the run is plain CAT bit for bit: the measurement draws from its own generator
    plain = CatLossConfig(alpha=1.0, class_word="dog")
    cat = _run(tiny_denoiser, build_examples(items(), text, plain), plain, tmp_path / "c")
    assert [h["loss"] for h in cat.history[:3]] == [h["loss"] for h in full.history[:3]]
    assert cat.history[3]["loss"] != full.history[3]["loss"]  # from step 4 the added probes are kept too


def test_resume_with_other_probes_is_refused_naming_them(tiny_denoiser, text, tmp_path):
    lc = loss_cfg(every=2, threshold=0.0, top_k=1, images=1)
    _run(tiny_denoiser, build_examples(items(), text, lc), lc, tmp_path / "a", save_every=4)
    other = loss_cfg(every=2, threshold=0.0, top_k=1, images=1, probes=("horse",))
    # the run's settings check (run_folder) names the field and both values before the term's own state is read
    with pytest.raises(ValueError, match=r'loss\.auto\.probes \["cat", "wolf", "fox", "car"\] -> \["horse"\]'):
        _run(tiny_denoiser, build_examples(items(), text, other), other, tmp_path / "b",
             resume=checkpoint_path(tmp_path / "a", 4))


def test_lora_metadata_records_the_settings_and_the_probes_added():
    lc = loss_cfg()
    history = [{"step": 1}, {"step": 2, "auto_added": [["wolf", 2, 0.0912345678]]}]
    meta = registry.metadata(lc, TrainConfig(), history)
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["cat_auto_preservation_added"]) == [{"probe": "wolf", "step": 2, "drift": 0.091235}]
    assert json.loads(meta["cat_auto_preservation"])["probes"] == list(PROBES)
    assert meta["cat_auto_preservation_active"] == "true"
    off = registry.metadata(CatLossConfig(), TrainConfig())
    assert off["cat_auto_preservation_active"] == "false" and off["cat_auto_preservation_added"] == "[]"
    assert "cat_apt" in off  # APT's keys stay


def test_bench_auto_method_starts_from_the_class_prompt_with_the_other_shapes_as_probes():
    from cat_train.world import bench
    from cat_train.world import generator as wg

    assert bench.method_name("cat1:auto") == "cat1:auto" and bench.label("cat1:auto") == "CAT (α=1, y=auto)"
    with pytest.raises(Exception, match="auto and nearest need alpha > 0"):
        bench.method_name("cat0:auto")
    a = bench.auto_config(bench.BenchConfig())
    assert set(a.probes) == set(wg.SHAPES) - {wg.IDENTITY_CLASS} and a.active

    class Text:  # the "context" is the prompt's length, so each probe's prompt is readable
        def encode_text(self, ps):
            return {"context": torch.tensor([[[float(len(p))]] for p in ps])}

    ex, lc, _ = bench.examples_for("cat1:auto", Text(), bench.BenchConfig(), seed=0)
    assert len(ex) == 5 and lc.preservation == "class" and lc.auto == a  # y starts as the class prompt alone
    for e, sc in zip(ex, wg.identity_scenes()):  # each image's probes: the other shapes on its own background
        assert e.cond_pres["context"].item() == len(f"a circle on a {sc.background} background")
        assert {p: c["context"].item() for p, c in e.probes.items()} == {
            s: float(len(f"a {s} on a {sc.background} background")) for s in a.probes}


def test_measured_images_are_spread_over_the_dataset(tiny_denoiser, text):
    """A multi-concept folder lists one concept after the other: the first n images could all be one concept."""
    from cat_train.measure.validation import Validator

    exs = build_examples(items(4), text, loss_cfg())
    v = Validator(tiny_denoiser, exs, max_images=2, image_probes=True, kinds=("probe",))
    assert [img.latent.data_ptr() for img in v.images] == [exs[0].latent.data_ptr(), exs[2].latent.data_ptr()]
    assert {kind for p in v.passes for _, _, kind, _ in p.rows} == {"probe"}  # no fit or keep rows are run
    assert sum(len(p.rows) for p in v.passes) == 2 * len(PROBES)
