import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cat_train.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.world.toytext import HashTextEncoder  # noqa: E402
from cat_train.world.unet import TINY_CONFIG, UNet  # noqa: E402


@pytest.fixture
def tiny_denoiser():
    torch.manual_seed(0)
    unet = UNet(**TINY_CONFIG)
    with torch.no_grad():  # ldm zero-inits output convs; random ones make LoRA effects visible everywhere
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return ModuleDenoiser(unet)


class RecordingText(HashTextEncoder):
    """The toy encoder, remembering every batch of prompts it was asked to encode."""

    def __init__(self):
        super().__init__(dim=64, length=6)
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return super().__call__(prompts)


@pytest.fixture
def text():
    return RecordingText()
