import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cat_train.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.unet import TINY_CONFIG, UNet  # noqa: E402


@pytest.fixture
def tiny_denoiser():
    torch.manual_seed(0)
    unet = UNet(**TINY_CONFIG)
    with torch.no_grad():  # ldm zero-inits output convs; random ones make LoRA effects visible everywhere
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return ModuleDenoiser(unet)


class HashText:
    """A deterministic toy text encoder: words -> fixed random embeddings, padded to 6 tokens."""

    def __init__(self, dim=64, length=6, vocab=97):
        g = torch.Generator().manual_seed(1)
        self.table, self.length, self.vocab = torch.randn(vocab, dim, generator=g), length, vocab
        self.calls = []

    def ids(self, prompt: str) -> list[int]:
        words = prompt.replace(",", " ").split()
        return [sum(map(ord, w)) % (self.vocab - 1) + 1 for w in words][: self.length] + [0] * max(0, self.length - len(words))

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return {"context": self.table[torch.tensor([self.ids(p) for p in prompts])]}


@pytest.fixture
def text():
    return HashText()
