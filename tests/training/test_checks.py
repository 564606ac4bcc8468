"""Bad inputs refused before any model work, with the field, the line and the fix named."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cat_train.training.checks import check_concepts, parse_token_weights
from cat_train.training import CatLossConfig

ROOT = Path(__file__).resolve().parents[2]


def lora_io():
    """nodes/lora_io.py alone: the nodes package imports ComfyUI, this module does not."""
    spec = importlib.util.spec_from_file_location("cat_lora_io", ROOT / "nodes" / "lora_io.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_token_weights_parse_lines_and_commas():
    assert parse_token_weights("sks=1.5\n\n zwx = 0.25 , abc=0\n") == {"sks": 1.5, "zwx": 0.25, "abc": 0.0}
    assert parse_token_weights("  \n") == {}


@pytest.mark.parametrize("text, message", [
    ("sks=1\nsks=abc", "token_weights line 2 ('sks=abc'): weight 'abc' is not a number; one 'token=weight' per line"),
    ("sks 1.5", "token_weights line 1 ('sks 1.5') must look like 'sks=1.5'"),
    ("=2", "token_weights line 1 ('=2') must look like 'sks=1.5'"),
    ("sks=", "token_weights line 1 ('sks=') must look like 'sks=1.5'"),
    ("sks=1, zwx=-1", "token_weights line 1 ('zwx=-1'): weight -1 must be a finite number >= 0"),
    ("sks=nan", "token_weights line 1 ('sks=nan'): weight nan must be a finite number >= 0"),
    ("sks=1\nzwx=2\nsks=3", "token_weights line 3 ('sks=3'): token 'sks' is given twice"),
])
def test_bad_token_weights_name_the_line_and_the_format(text, message):
    with pytest.raises(ValueError) as err:
        parse_token_weights(text)
    assert message in str(err.value), str(err.value)


def test_weight_for_a_token_that_is_no_trigger_is_refused():
    check_concepts(("sks", "zwx"), CatLossConfig(class_word="dog", token_weights={"zwx": 2.0}))  # fine
    with pytest.raises(ValueError, match=r"token_weights names 'skz', which is not a trigger of the dataset "
                                         r"\(triggers: sks, zwx\).*fix the spelling or remove the line"):
        check_concepts(("sks", "zwx"), CatLossConfig(class_word="dog", token_weights={"skz": 2.0}))


@pytest.mark.parametrize("trigger, class_word, preservation, alpha, refused", [
    ("toy", "toy", "class", 1.0, True),
    ("Toy", "toy", "class", 1.0, True),
    ("sks", "toy", "class", 1.0, False),
    ("toy", "toy", "strip", 1.0, False),   # y strips the trigger: it differs from y_T
    ("toy", "toy", "class", 0.0, False),   # plain LoRA: no CAT term to break
])
def test_trigger_equal_to_class_word_is_refused_for_class_preservation(trigger, class_word, preservation, alpha,
                                                                        refused):
    cfg = CatLossConfig(alpha=alpha, preservation=preservation, class_word=class_word)
    if not refused:
        check_concepts((trigger,), cfg)
        return
    with pytest.raises(ValueError, match=r"y\) would equal the training caption \(y_T\)|the trigger itself") as err:
        check_concepts((trigger,), cfg)
    assert repr(trigger) in str(err.value)


@pytest.mark.parametrize("bad", ["../evil", "a/../../evil", "/abs/evil", "..", "C:evil", "a\\b", "~/x"])
def test_bad_checkpoint_name_is_reported_as_checkpoint_name(tmp_path, bad):
    lio = lora_io()
    msg = lio.name_problem(tmp_path, bad, "checkpoint_name", "output/cat_checkpoints", "cat_run")
    assert msg.startswith(f"checkpoint_name {bad!r} names a path outside output/cat_checkpoints; use a plain name "
                          "such as 'cat_run'"), msg
    assert "LoRA" not in msg
    with pytest.raises(ValueError, match=r"^LoRA name .* outside the loras folder"):
        lio.safe_lora_path(tmp_path, bad)


def test_name_checks_pass_good_and_linked_names(tmp_path):
    lio = lora_io()
    assert lio.name_problem(tmp_path, "runs/dog_v2", "name", "the loras folder", "my_concept") is True
    assert lio.name_problem(tmp_path, None, "name", "the loras folder", "my_concept") is True  # a link: known later
    assert lio.name_problem(tmp_path, "  ", "name", "the loras folder", "my_concept").startswith("name is empty")
    assert not list(tmp_path.iterdir())  # checking creates nothing


def test_given_preservation_prompts_replace_the_class_word_check():
    cfg = CatLossConfig(alpha=1.0, preservation="class", class_word="toy",
                        preservation_prompts=("a doll", "a teddy bear"))  # "a toy" holds the trigger itself
    check_concepts(("toy",), cfg)  # y comes from the list, never from 'toy' -> 'toy'


def test_masked_training_refuses_mask_files_the_dataset_could_not_use():
    """Issue 32: with masked training on, an image whose mask could not be read would train unmasked: refused,
    naming the mask file; off, the run goes on."""
    from cat_train.training import CatLossConfig
    from cat_train.training.checks import check_masks

    problem = "mask /d/a-masklabel.png is 32x32 but its image a.png is 64x64; save the mask at the image's size"
    check_masks([problem], CatLossConfig(1.0, "class", "dog"))  # masks weigh nothing: no error
    check_masks([], CatLossConfig(1.0, "class", "dog", mask_floor=0.1))
    with pytest.raises(ValueError) as err:
        check_masks([problem], CatLossConfig(1.0, "class", "dog", mask_floor=0.1))
    assert str(err.value) == (
        "masked training is on (mask_floor 0.1, mask_keep 0.0) but 1 mask file(s) cannot be used: " + problem
        + ". Fix or remove those files, or set mask_floor 1 and mask_keep 0 to train without masks.")
