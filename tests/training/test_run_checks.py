"""Settings valid alone that together train something else than they say (issue 32): refused before step 1 with the
inputs and the fix named, or warned with numbers (cat_train.training.config.check_run, check_concepts)."""
from __future__ import annotations

import pytest
import torch

from cat_train.adapters.lora import LoraSpec
from cat_train.terms.auto_config import AutoPreservationConfig
from cat_train.training import CatLossConfig, TrainConfig, build_examples, train
from cat_train.training.checks import check_concepts
from cat_train.training.config import check_run


def test_an_ema_that_would_leave_the_lora_nearly_empty_is_refused_with_its_strength_and_a_decay():
    with pytest.raises(ValueError) as err:
        check_run(TrainConfig(steps=100, ema_decay=0.9999), CatLossConfig())
    text = str(err.value)
    # 0.9999^100 = 0.990: the zero start is 99.0% of the average, the LoRA about 1.0% of what it learned
    assert "ema_decay 0.9999 over 100 averaged steps" in text and "weigh 99.0% of the result" in text, text
    assert "about 1.0% of what it learns" in text and "Use ema_decay 0.97 or lower" in text, text
    assert 0.97 ** 100 < 0.05 < 0.971 ** 100  # the suggested decay brings the start's share just under 5%


def test_a_weak_ema_is_warned_and_a_usual_one_is_not():
    warned = check_run(TrainConfig(steps=600, ema_decay=0.999), CatLossConfig())  # 0.999^600 = 54.9%
    assert len(warned) == 1 and "weigh 54.9% of the result" in warned[0], warned
    assert "; ema_decay 0.995 or lower (about 200 steps averaged) keeps it under 5%" in warned[0], warned
    assert check_run(TrainConfig(steps=600, ema_decay=0.99), CatLossConfig()) == []  # 0.99^600 = 0.2%
    late = check_run(TrainConfig(steps=600, ema_decay=0.999, ema_start_step=100), CatLossConfig())
    assert "the weights of step 100 would still weigh 60.6%" in late[0], late  # 0.999^500


def test_an_ema_start_past_the_last_step_is_refused():
    for start in (100, 250):
        with pytest.raises(ValueError, match=rf"ema_start_step {start} is at or past the last step \(100\): the "
                                             "average would never start, yet the LoRA would be recorded as EMA"):
            check_run(TrainConfig(steps=100, ema_decay=0.9, ema_start_step=start), CatLossConfig())
    check_run(TrainConfig(steps=100, ema_decay=0.0, ema_start_step=250), CatLossConfig())  # EMA off: nothing to say


def test_caption_options_without_shuffle_tags_are_warned():
    assert check_run(TrainConfig(keep_tags=1), CatLossConfig()) == [
        "keep_tags 1 does nothing while shuffle_tags is off: captions are used as they are. Turn shuffle_tags on (CAT "
        "Training Options) to shuffle them, or leave these at their defaults (keep_tags 0, caption_variants 8)."]
    assert check_run(TrainConfig(keep_tags=2, caption_variants=4), CatLossConfig())[0].startswith(
        "keep_tags 2 and caption_variants 4 do nothing while shuffle_tags is off")
    assert check_run(TrainConfig(keep_tags=1, caption_variants=4, shuffle_tags=True), CatLossConfig()) == []


def test_keep_every_at_or_past_the_steps_is_refused_as_a_plain_lora_recorded_as_cat():
    with pytest.raises(ValueError, match="keep_every 100 with 100 steps puts the CAT term on step 1 only.*plain LoRA "
                                         r"recorded as CAT \(factor 1.0\). Use keep_every of at most 10"):
        check_run(TrainConfig(steps=100), CatLossConfig(keep_every=100))
    check_run(TrainConfig(steps=100), CatLossConfig(keep_every=10))
    check_run(TrainConfig(steps=1), CatLossConfig(keep_every=1))  # exact CAT, however short


def test_auto_preservation_that_never_measures_is_refused():
    auto = AutoPreservationConfig(every=700, probes=("cat",))
    with pytest.raises(ValueError, match=r"auto preservation `every` 700 with 600 steps never measures, so it adds no "
                                         "prompt.*set `every` to at most 150"):
        check_run(TrainConfig(steps=600), CatLossConfig(class_word="dog", auto=auto))
    with pytest.raises(ValueError, match="measures only after the last step"):
        check_run(TrainConfig(steps=700), CatLossConfig(class_word="dog", auto=auto))
    # nearest chooses its words when the run starts: the check counts `neighbours`, never asks for the word list
    nearest = AutoPreservationConfig(every=2, first=1, source="nearest", neighbours=3)
    warned = check_run(TrainConfig(steps=2), CatLossConfig(class_word="dog", auto=nearest), 2)
    assert len(warned) == 1 and warned[0].startswith("auto preservation: 3 probes x 2 images x 4 points"), warned
    # an early first measurement (`first`) is one in the run, whatever `every` is; a late one is refused by name
    early = AutoPreservationConfig(every=700, first=5, probes=("cat",))
    check_run(TrainConfig(steps=600), CatLossConfig(class_word="dog", auto=early))
    with pytest.raises(ValueError, match=r"auto preservation `first` 600 with 600 steps measures only after the last"):
        check_run(TrainConfig(steps=600), CatLossConfig(class_word="dog", auto=AutoPreservationConfig(
            every=700, first=600, probes=("cat",))))


def test_auto_preservation_with_many_probes_gets_a_cost_estimate():
    probes = tuple(f"thing{i}" for i in range(500))
    loss = CatLossConfig(class_word="dog", auto=AutoPreservationConfig(every=50, probes=probes))
    warned = check_run(TrainConfig(steps=600), loss, images=10)
    # 500 probes x 4 images (of 10) x 4 points = 8000 forwards, 12 times; training 600 x 1 x 7 = 4200 forward-units
    assert len(warned) == 1 and "500 probes x 4 images x 4 points = 8000 UNet forwards per measurement, 12 " \
        "measurements (every 50 of 600 steps): about 22.9x the compute of the training itself" in warned[0], warned
    assert "up to 5000 probe prompts to encode" in warned[0]
    few = CatLossConfig(class_word="dog", auto=AutoPreservationConfig(every=50, probes=("cat", "wolf")))
    assert check_run(TrainConfig(steps=600), few, images=10) == []  # 2 probes: 0.09x


@pytest.mark.parametrize("loss, message", [
    (CatLossConfig(class_word="dog", preservation_prompts=("a photo of sks dog",)),
     "preservation prompt 'a photo of sks dog' holds the trigger 'sks': it would be held at the base model"),
    (CatLossConfig(class_word="dog", auto=AutoPreservationConfig(every=10, probes=("cat", "sks dog"))),
     "auto preservation probe 'sks dog' holds the trigger 'sks'"),
])
def test_the_trigger_in_a_prompt_held_at_the_base_is_refused(loss, message):
    with pytest.raises(ValueError) as err:
        check_concepts(("sks",), loss)
    assert message in str(err.value) and "Write it without the trigger (e.g. " in str(err.value), str(err.value)


def test_the_class_word_as_the_only_probe_is_refused_with_what_to_give_instead():
    loss = CatLossConfig(class_word="dog", auto=AutoPreservationConfig(every=10, probes=("dog",)))
    with pytest.raises(ValueError) as err:
        check_concepts(("sks",), loss)
    assert "only probe is the class word 'dog', which y already preserves" in str(err.value)
    assert "build_examples" not in str(err.value)  # no word about the Python API to a node user
    check_concepts(("sks",), CatLossConfig(class_word="dog", auto=AutoPreservationConfig(every=10,
                                                                                         probes=("dog", "cat"))))


def test_train_refuses_before_step_1(tiny_denoiser, text):
    items = [(torch.randn(4, 8, 8), "a photo of sks dog", ("sks",))]
    exs = build_examples(items, text, CatLossConfig(class_word="dog"))
    steps = []
    with pytest.raises(ValueError, match="ema_start_step 5 is at or past the last step"):
        train(tiny_denoiser, exs, CatLossConfig(class_word="dog"), LoraSpec(rank=2),
              TrainConfig(steps=5, ema_decay=0.9, ema_start_step=5), callback=steps.append)
    assert steps == []
    warned = train(tiny_denoiser, exs, CatLossConfig(class_word="dog"), LoraSpec(rank=2),
                   TrainConfig(steps=2, keep_tags=1))
    assert any(w.startswith("keep_tags 1 does nothing") for w in warned.warnings), warned.warnings
