"""Files the trainer writes take the umask's mode, like any file the user writes: a LoRA saved 0600
(what a mkstemp temp file gives) cannot be loaded by other users of a shared ComfyUI server."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from cat_train.adapters.export import save_lora
from cat_train.training.checkpoints import save as save_checkpoint
from cat_train.training import checkpoint_path


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_lora_and_checkpoint_modes_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    lora = save_lora(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, {"ss_network_dim": "4"})
    assert stat.S_IMODE(lora.stat().st_mode) == want, oct(lora.stat().st_mode)
    again = save_lora(lora, {"w": torch.ones(2)}, {}, overwrite=True)  # the os.replace path
    assert stat.S_IMODE(again.stat().st_mode) == want
    ckpt = save_checkpoint({"step": 1}, checkpoint_path(tmp_path / "ckpt", 1))
    assert stat.S_IMODE(ckpt.stat().st_mode) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "ckpt"]  # no temp file left behind
