"""Resuming from a file that is not a CAT checkpoint says so, and never passes on torch's advice to
load with weights_only=False (which runs whatever code the file carries)."""
from __future__ import annotations

import traceback

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, lora_layers
from cat_train.adapters.export import save_lora
from cat_train.training import CatLossConfig
from cat_train.training import TrainConfig, build_examples, train

NOT_OURS = "is not a CAT training checkpoint (cat-stepNNNNNN.pt written by this trainer)"


class Payload:  # a pickled object of an arbitrary class: what the safe loader refuses
    pass


def _files(tmp_path):
    files = {}
    files["pickle_with_code"] = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, files["pickle_with_code"])
    files["lora"] = save_lora(tmp_path / "my_lora.safetensors", {"w": torch.zeros(2)}, {})
    files["text"] = tmp_path / "notes.pt"
    files["text"].write_text("resume from here\n")
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["other_dict"] = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files["other_dict"])
    files["tensor"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), files["tensor"])
    return files


@pytest.mark.parametrize("kind", ["pickle_with_code", "lora", "text", "empty", "other_dict", "tensor"])
def test_resume_from_a_foreign_file_is_refused_plainly(tiny_denoiser, text, tmp_path, kind):
    path = _files(tmp_path)[kind]
    g = torch.Generator().manual_seed(0)
    exs = build_examples([(torch.randn(4, 8, 8, generator=g), "a photo of sks dog", ("sks",))], text,
                         CatLossConfig(class_word="dog"))
    with pytest.raises(ValueError) as err:
        train(tiny_denoiser, exs, CatLossConfig(class_word="dog"), LoraSpec(rank=2), TrainConfig(steps=2), resume=path)
    msg = str(err.value)
    assert msg.startswith(f"{path} {NOT_OURS}"), msg
    shown = "".join(traceback.format_exception(err.value))  # what a user sees, chained causes included
    assert "weights_only" not in shown and "arbitrary code" not in shown, shown
    assert not lora_layers(tiny_denoiser.module)  # nothing was injected


def test_missing_resume_file_stays_a_file_error(tiny_denoiser, text, tmp_path):
    exs = build_examples([(torch.zeros(4, 8, 8), "a photo of sks dog", ("sks",))], text,
                         CatLossConfig(class_word="dog"))
    with pytest.raises(FileNotFoundError):
        train(tiny_denoiser, exs, CatLossConfig(class_word="dog"), LoraSpec(rank=2), TrainConfig(steps=2),
              resume=tmp_path / "cat-step000004.pt")
