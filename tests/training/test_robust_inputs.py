"""Issue 22, raw or misleading errors made clear and silent scores refused (core side; the nodes in tests/comfy)."""
from __future__ import annotations

import math
import traceback

import pytest
import torch

from cat_train.measure import metrics as M
from cat_train.adapters.lora import LoraSpec
from cat_train.terms.apt_config import AptConfig
from cat_train.training.checks import check_image_batch
from cat_train.adapters.export import save_lora
from cat_train.training.run_folder import StorageError
from cat_train.training import TrainConfig
from tests.measure.test_metrics import tiny_clip  # noqa: F401 - the fixture


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -1.0, 0.0])
def test_lora_alpha_nan_is_refused_by_name_not_reported_as_a_learning_rate(alpha):
    with pytest.raises(ValueError, match=r"LoRA alpha \(lora_alpha\) must be a finite number > 0"):
        LoraSpec(rank=4, alpha=alpha)


@pytest.mark.parametrize("lr", [math.nan, math.inf])
def test_a_non_finite_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match="learning rate must be a finite number > 0"):
        TrainConfig(lr=lr)


@pytest.mark.parametrize("field", ["stabilize_layers", "align_layers"])
def test_an_apt_layer_pattern_that_is_no_regex_names_its_field(field):
    with pytest.raises(ValueError) as err:
        AptConfig(stabilize=1.0, **{field: "((("})
    assert str(err.value).startswith(f"APT {field} '(((' is not a valid regular expression"), str(err.value)


def test_blank_and_nan_images_are_refused_before_scoring():
    ok = torch.rand(2, 8, 8, 3)
    check_image_batch(ok, "images_with_trigger")
    black = ok.clone()
    black[1] = 0
    with pytest.raises(ValueError, match="images_without_trigger image 2 of 2 is blank \\(every pixel 0"):
        check_image_batch(black, "images_without_trigger")
    nan = ok.clone()
    nan[0, 3, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="images_with_trigger image 1 of 2 holds NaN/inf pixels"):
        check_image_batch(nan, "images_with_trigger")


@pytest.mark.parametrize("content", [b"\x00garbage" * 100, b"PK\x03\x04truncated zip", b"not a checkpoint\n"],
                         ids=["binary", "zip", "text"])
def test_a_garbage_open_clip_file_gets_no_unsafe_loading_advice(tiny_clip, tmp_path, content):  # noqa: F811
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(content)
    with pytest.raises(ValueError) as err:
        M.ClipScorer("cat-test-tiny-clip", bad)
    shown = "".join(traceback.format_exception(err.value)).replace("test_robust_inputs.py", "")
    assert err.value.__suppress_context__ and err.value.__cause__ is None
    assert f"cannot read {bad} as an open_clip checkpoint" in str(err.value), str(err.value)
    assert "weights_only" not in shown and "Weights only" not in shown, shown


def test_a_full_disk_while_writing_a_lora_names_the_file_and_leaves_no_temp(tmp_path, monkeypatch):
    import errno
    import os

    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(StorageError, match=r"cannot write .*x\.safetensors \(No space left on device; .* MB\); free "
                                           r"space"):
        save_lora(tmp_path / "x.safetensors", {"w": torch.zeros(4)}, {})
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_loras_folder_names_the_file(tmp_path, monkeypatch):
    import errno
    import os

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "open", ro)
    with pytest.raises(StorageError, match="its folder is not writable \\(Read-only file system\\)"):
        save_lora(tmp_path / "x.safetensors", {"w": torch.zeros(4)}, {})


def test_a_chunk_boundary_caption_is_padded_to_the_longest_not_to_the_common_multiple(caplog):
    from cat_train.step.conds import repeat_to_common_length

    # a trigger on the 75-token boundary: one chunk more
    y_t, y = torch.randn(1, 77 * 21, 8), torch.randn(1, 77 * 20, 8)
    with caplog.at_level("WARNING", logger="cat_train"):
        a, b = repeat_to_common_length([y_t, y])
    assert a.shape[1] == b.shape[1] == 77 * 21  # not lcm = 420 chunks
    assert torch.equal(a, y_t) and torch.equal(b[:, :77 * 20], y) and torch.equal(b[:, 77 * 20:], y[:, :77])
    assert "common multiple (32340 tokens, 21x the shortest)" in caplog.text and "75-token boundary" in caplog.text
    # ComfyUI's own bound: up to 4x the shortest, the exact whole repeats stay (runs keep their numbers)
    c, d = repeat_to_common_length([torch.randn(1, 77 * 3, 8), torch.randn(1, 77 * 4, 8)])
    assert c.shape[1] == d.shape[1] == 77 * 12


def test_preservation_prompts_share_conditionings_report_progress_and_warn_when_many(text, caplog):
    from cat_train.training import CatLossConfig
    from cat_train.training import build_examples

    prompts = tuple(f"a photo of thing {i}" for i in range(2000))
    loss = CatLossConfig(preservation_prompts=prompts)
    seen = []
    with caplog.at_level("WARNING", logger="cat_train"):
        exs = build_examples([(torch.zeros(4, 8, 8), f"sks dog {i}", ("sks",)) for i in range(3)], text, loss,
                             progress=lambda done, total: seen.append((done, total)))
    assert len(exs) == 6000 and seen[-1] == (2003, 2003) and len(seen) == 2003
    assert exs[0].cond_pres is exs[2000].cond_pres  # one conditioning per prompt, not one per pair
    assert "3 images x 2000 preservation prompts = 6000 training examples" in caplog.text


def test_batch_size_over_the_images_is_warned_in_the_result(tiny_denoiser, text):
    from cat_train.training import CatLossConfig
    from cat_train.training import build_examples, train

    loss = CatLossConfig(class_word="dog")
    exs = build_examples([(torch.randn(4, 8, 8), "sks dog", ("sks",)) for _ in range(3)], text, loss)
    res = train(tiny_denoiser, exs, loss, LoraSpec(rank=2), TrainConfig(steps=1, batch_size=8))
    assert res.warnings == ["batch_size 8 is larger than the number of examples (3): every batch repeats images, which "
                            "costs memory and time and trains nothing more; lower batch_size to 3 or less (raise "
                            "grad_accum for a larger effective batch)."]
    assert train(tiny_denoiser, exs, loss, LoraSpec(rank=2), TrainConfig(steps=1, batch_size=3)).warnings == []
