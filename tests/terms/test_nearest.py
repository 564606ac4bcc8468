"""`nearest` auto preservation: probes ranked from the class word alone by the model's own text encoder, the
shipped vocabulary, the unit-free `relative` rule, the early-check schedule, and the LoRA header's record."""
import json
import math
import re
from dataclasses import replace

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, inject_lora
from cat_train.terms import nearest
from cat_train.terms.auto import AutoPreservation
from cat_train.terms.auto_checks import due, scores
from cat_train.terms.auto_config import AutoPreservationConfig
from cat_train.terms.registry import metadata as term_metadata
from cat_train.training import CatLossConfig, TrainConfig, build_examples, train

# A toy encoder whose answer is known: each word is one token with a fixed vector, at its position in the prompt, so
# encode("a photo of w") - encode("a photo of") is w's vector at position 3 and sim(w) = cos(E[w], E[dog]).
E = {"dog": (1.0, 0.0, 0.0), "wolf": (0.9, 0.1, 0.0), "fox": (0.8, 0.6, 0.0), "cat": (0.6, 0.8, 0.0),
     "car": (0.0, 0.0, 1.0), "hot": (0.0, 1.0, 1.0), "zzq": (0.5, 0.5, 0.5), "zzr": (0.5, 0.5, 0.5),
     "a": (0.0, 0.3, 0.1), "photo": (0.2, 0.0, 0.4), "of": (0.1, 0.1, 0.1), "sks": (1.0, 0.1, 0.0)}


def toy_encode(prompts):
    out = torch.zeros(len(prompts), 6, 3)
    for i, p in enumerate(prompts):
        for j, w in enumerate(p.split()[:6]):
            out[i, j] = torch.tensor(E.get(w, (0.3, 0.3, 0.3)))  # unknown words share one token, as the world's
    return out


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_ranking_on_a_toy_encoder_gives_the_known_nearest_words_with_their_cosines():
    got = nearest.rank("dog", "a photo of dog", ["car", "cat", "wolf", "fox", "hot dog", "zzq", "zzr", "sks"],
                       toy_encode, k=3, exclude=("sks",), floor=0.0)
    assert got.words == ("wolf", "fox", "cat")
    assert [s for _, s in got.probes] == pytest.approx([cos(E[w], E["dog"]) for w in ("wolf", "fox", "cat")], abs=1e-6)
    assert [round(s, 3) for _, s in got.probes] == [0.994, 0.8, 0.6]
    # left out: "hot dog" holds the class word, "sks" is a trigger, zzq and zzr encode alike (no token of their own)
    assert got.candidates == 3 + 1 and got.left_out == 4  # car ranked, not chosen
    assert got.report()["probes"] == [["wolf", 0.9939], ["fox", 0.8], ["cat", 0.6]] and got.seconds >= 0
    # without the class word in y, the words alone are compared, from the empty prompt
    bare = nearest.rank("dog", "a photo", ["cat", "wolf", "car"], toy_encode, k=2, floor=0.0)
    assert bare.words == ("wolf", "cat")
    # the floor: of the 3 nearest, cat (0.6) is below 0.75 x wolf's 0.994, so no neighbour however many k allows
    floored = nearest.rank("dog", "a photo of dog", ["car", "cat", "wolf", "fox"], toy_encode, k=3)
    assert nearest.FLOOR == 0.75 and floored.words == ("wolf", "fox") and floored.candidates == 4


def test_the_shipped_vocabulary_holds_things_an_image_shows_and_no_colour_or_background():
    words = set(nearest.vocabulary())
    # kept: commonest sense a shape, an artifact, a celestial body, a plant, a food, a person, an animal
    assert {"square", "triangle", "star", "cross", "rose", "orange", "woman", "salmon"} <= words
    # left out: attributes (colours, "background"), a colour whose commonest sense is a person, a communication
    assert not {"background", "blue", "green", "red", "white", "grey", "drawing"} & words


def test_the_shipped_vocabulary_is_a_few_thousand_common_nouns_and_class_names_with_its_source_named():
    words = nearest.vocabulary()
    assert 5000 < len(words) < 7000 and len(set(words)) == len(words)
    for w in ("dog", "wolf", "cat", "circle", "square", "triangle", "star", "cross", "painting", "teddy bear",
              "golden retriever"):
        assert w in words
    head = nearest.VOCABULARY.read_text().split("\n", 12)[:12]
    assert any("WordNet 3.0" in ln for ln in head) and any("ImageNet" in ln for ln in head)
    assert (nearest.VOCABULARY.parent / "README.md").is_file()


def test_build_examples_probes_each_image_with_its_class_word_s_nearest(text):
    lc = CatLossConfig(alpha=1.0, class_word="dog",
                       auto=AutoPreservationConfig(every=5, source="nearest", neighbours=4))
    rows = [(torch.zeros(4, 8, 8), f"a photo of sks dog {i}", ("sks",)) for i in range(2)]
    calls = []

    def rank_text(prompts):
        calls.append(len(prompts))
        return text(prompts)["context"]
    exs = build_examples(rows, text, lc, rank_text=rank_text)
    chosen = exs[0].rankings[0]
    assert chosen.class_word == "dog" and len(chosen.words) == 4 and exs[1].rankings[0] is chosen  # ranked once
    assert list(exs[0].probes) == list(chosen.words)
    assert exs[0].probes[chosen.words[0]]["context"].equal(text([f"a photo of {chosen.words[0]} 0"])["context"][0])
    vocab = nearest.vocabulary()
    holding = sum(1 for w in vocab if re.search(r"(?<!\w)(dog|sks)(?!\w)", w))  # "dog", "hot dog", ...: not ranked
    assert holding >= 5 and chosen.candidates + chosen.left_out == len(vocab)
    assert sum(calls) == 2 + len(vocab) - holding  # every candidate encoded once, + y and the template
    sims = [s for _, s in chosen.probes]
    assert sims == sorted(sims, reverse=True)
    with pytest.raises(ValueError, match="class_word is empty"):
        build_examples([(torch.zeros(4, 8, 8), "a photo", ())], text,
                       CatLossConfig(alpha=1.0, preservation="strip", class_word="",
                                     auto=AutoPreservationConfig(every=5, source="nearest")))


def test_multi_concept_datasets_rank_each_class_word_with_the_others_among_the_candidates():
    lc = CatLossConfig(alpha=1.0, class_word="sks=dog, zwx=cat",
                       auto=AutoPreservationConfig(every=5, source="nearest", neighbours=2))
    rows = [(torch.zeros(4, 8, 8), "a photo of sks", ("sks",)), (torch.zeros(4, 8, 8), "a photo of zwx", ("zwx",))]
    toy = lambda ps: {"context": toy_encode(ps)}
    # the shipped vocabulary: of its words the toy knows wolf, fox, cat, car, photo
    a, b = build_examples(rows, toy, lc)
    assert a.rankings[0].words[0] == "wolf" and b.rankings[1].words[0] == "fox"  # cos 0.994 to dog, 0.96 to cat
    assert a.rankings is b.rankings  # one tuple of the run's rankings, for the term's report
    # y without the class word (`strip`): each class word is still ranked; an image is probed with every ranking's
    a, b = build_examples(rows, toy, replace(lc, preservation="strip"))
    assert [r.class_word for r in a.rankings] == ["dog", "cat"]
    assert set(a.probes) == set(b.probes) == {w for r in a.rankings for w in r.words}
    # the other class word competes with the vocabulary's words (cat is 0.6 from dog, photo 0.447)
    images = [("a photo of dog", ("sks",), ["dog"]), ("a photo of cat", ("zwx",), ["cat"])]
    got = nearest.choose(images, lc.class_word, toy_encode, 2, candidates=["car", "photo"])
    # photo (0.447) is below 0.75 x cat's 0.6: the floor leaves it out
    assert got["dog"].words == ("cat",) and got["cat"].words == ("dog",)
    assert [round(s, 3) for _, s in got["dog"].probes] == [0.6]


def test_the_world_s_encoder_ranks_the_other_shapes_among_the_eight_nearest_to_circle():
    from cat_train.world import bench

    w = bench.World()
    got = nearest.rank("circle", "a circle on a grey background", nearest.vocabulary(),
                       nearest.context_encoder(w.encode_text), 8)
    # the four other shapes, and nothing else: the next candidate is far below the floor
    assert set(got.words) == {"square", "triangle", "star", "cross"}
    assert [s for _, s in got.probes] == pytest.approx([0.885, 0.810, 0.799, 0.772], abs=2e-3)
    # the world's tokenizer hashes every unknown word onto 16 spare ids: those words share conditionings, left out
    assert got.candidates < 400 and got.left_out > 5000


def test_early_checks_double_from_first_until_every():
    assert [s for s in range(1, 130) if due(s, 50, 5)] == [5, 10, 20, 40, 50, 100]
    assert [s for s in range(1, 130) if due(s, 50)] == [50, 100]
    assert [s for s in range(1, 12) if due(s, 4, 1)] == [1, 2, 4, 8]
    assert not any(due(s, 0, 5) for s in range(1, 20))


def test_relative_scores_are_the_drift_over_the_kept_prompt_s_and_absolute_ones_the_drift():
    assert scores({"cat": 0.02, "wolf": 0.005}, 0.01, "relative") == {"cat": 2.0, "wolf": 0.5}
    assert scores({"cat": 0.02}, 0.01, "absolute") == {"cat": 0.02}
    assert scores({"cat": 0.02}, 0.0, "relative") == {"cat": 0.0}  # nothing kept moved yet: nothing is "more"


class Scaled:
    """The denoiser with every prediction multiplied by `k`: the same model in other units."""

    def __init__(self, den, k):
        self.den, self.k = den, k
        self.module, self.schedule, self.prediction_type = den.module, den.schedule, den.prediction_type

    def predict(self, x_t, t, cond):
        return self.den.predict(x_t, t, cond) * self.k


def _measured(den, exs, cfg):
    term = AutoPreservation(den, cfg)
    term.start(exs)
    term.end_of_step(cfg.every)
    return term


def test_the_relative_rule_keeps_the_same_probes_when_the_model_s_outputs_are_scaled_by_10(tiny_denoiser, text):
    probes = ("cat", "wolf", "fox", "car", "horse", "bird")
    lc = CatLossConfig(alpha=1.0, class_word="dog", auto=AutoPreservationConfig(
        every=2, probes=probes, top_k=3, threshold=1.0, rule="relative", points=3))
    exs = build_examples([(torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i)), f"a photo of sks dog {i}",
                           ("sks",)) for i in range(3)], text, lc)
    inject_lora(tiny_denoiser.module, LoraSpec(rank=4, preset="full"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA that moves every prompt a little, some more than others
        for n, p in tiny_denoiser.module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    one, ten = _measured(tiny_denoiser, exs, lc.auto), _measured(Scaled(tiny_denoiser, 10.0), exs, lc.auto)
    assert ten.kept == pytest.approx(100 * one.kept, rel=1e-4) and one.kept > 0  # the drift has units: x10 -> x100
    assert ten.drift == pytest.approx(one.drift, rel=1e-4)  # the scores have none
    # a threshold between the 3rd and 4th score: the rule keeps 3 of the 6 probes, the same 3 on both models
    ratios = sorted(one.drift.values(), reverse=True)
    rel = replace(lc.auto, threshold=(ratios[2] + ratios[3]) / 2, top_k=6)
    kept1, kept10 = (_measured(d, exs, rel).added for d in (tiny_denoiser, Scaled(tiny_denoiser, 10.0)))
    assert [p for p, _, _ in kept1] == [p for p, _, _ in kept10] and len(kept1) == 3
    # the absolute rule, set the same way on the first model, keeps every probe of the second: it has units
    absolute = replace(rel, rule="absolute", threshold=0.0)
    drifts = sorted(_measured(tiny_denoiser, exs, absolute).drift.values(), reverse=True)
    absolute = replace(absolute, threshold=(drifts[2] + drifts[3]) / 2)
    a1, a10 = (_measured(d, exs, absolute).added for d in (tiny_denoiser, Scaled(tiny_denoiser, 10.0)))
    assert len(a1) == 3 and len(a10) == len(probes)


def test_the_lora_header_and_the_report_record_the_chosen_probes_and_their_similarity(tiny_denoiser, text):
    lc = CatLossConfig(alpha=1.0, class_word="dog", auto=AutoPreservationConfig(
        every=2, source="nearest", neighbours=3, top_k=2, threshold=0.0, rule="relative", first=1, points=2))
    exs = build_examples([(torch.randn(4, 8, 8), "a photo of sks dog", ("sks",))], text, lc)
    infos = []
    res = train(tiny_denoiser, exs, lc, LoraSpec(rank=4, preset="full"),
                TrainConfig(steps=4, lr=3e-2, batch_size=1, seed=1), callback=infos.append)
    chosen = exs[0].rankings[0]
    want = [{"class_word": "dog", "probes": [[w, round(s, 4)] for w, s in chosen.probes],
             "candidates": chosen.candidates, "left_out": chosen.left_out, "seconds": round(chosen.seconds, 3)}]
    assert infos[0].reports["auto"]["auto_nearest"] == want  # the live view has them from step 1
    meta = term_metadata(lc, None, res.history)
    assert json.loads(meta["cat_auto_preservation_nearest"]) == want
    settings = json.loads(meta["cat_auto_preservation"])
    assert settings["source"] == "nearest" and settings["neighbours"] == 3 and settings["rule"] == "relative"
    added = json.loads(meta["cat_auto_preservation_added"])
    # first check: step 1
    assert [a["step"] for a in added] == [1, 1] and {a["probe"] for a in added} <= set(chosen.words)
    assert [i.reports["auto"]["measured"] for i in infos] == [1, 1, 1, 1]  # budget spent at step 1: no check at 2 or 4
    assert "cat_auto_preservation_nearest" not in term_metadata(CatLossConfig(), None)


def test_measuring_stops_once_every_probe_is_added_even_below_the_budget(tiny_denoiser, text):
    """A budget larger than the probes (nearest's floor can leave fewer than `neighbours`): nothing is left to decide
    once all are added, so nothing more is measured (the world's bench measured 14 times for 4 probes added at 1)."""
    lc = CatLossConfig(alpha=1.0, class_word="dog", auto=AutoPreservationConfig(
        every=2, probes=("cat", "wolf"), top_k=8, threshold=0.0, rule="relative", first=1, points=2))
    exs = build_examples([(torch.randn(4, 8, 8), "a photo of sks dog", ("sks",))], text, lc)
    infos = []
    train(tiny_denoiser, exs, lc, LoraSpec(rank=4, preset="full"), TrainConfig(steps=4, lr=3e-2, batch_size=1, seed=1),
          callback=infos.append)
    assert sorted(p for p, _, _ in infos[-1].reports["auto"]["auto_added"]) == ["cat", "wolf"]
    assert [i.reports["auto"]["measured"] for i in infos] == [1, 1, 1, 1]  # both added at step 1: no check at 2 or 4


def test_bench_nearest_method_gives_no_list_and_ranks_from_the_class_word():
    from cat_train.world import bench, methods

    assert methods.method_name("cat1:nearest") == "cat1:nearest"
    assert methods.label("cat1:nearest") == "CAT (α=1, y=nearest)"
    with pytest.raises(Exception, match="auto and nearest need alpha > 0"):
        methods.method_name("cat0:nearest")
    a = bench.nearest_config(bench.BenchConfig())
    assert a.source == "nearest" and a.probes == () and a.rule == "relative" and a.first == 5 and a.active
