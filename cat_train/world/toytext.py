"""A fixed random word-embedding 'text encoder' for tests and the quick demo (not CLIP).

Each word gets a deterministic embedding from a seeded table; prompts pad to a fixed length, so
y_T and y always encode to the same shape. It knows nothing about language: it only makes
different prompts give different conditionings, which is all the mechanics need.
"""
from __future__ import annotations

import torch


class HashTextEncoder:
    def __init__(self, dim: int = 64, length: int = 8, vocab: int = 1021, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.table, self.length, self.vocab = torch.randn(vocab, dim, generator=g), length, vocab

    def ids(self, prompt: str) -> list[int]:
        words = prompt.replace(",", " ").lower().split()[: self.length]
        ids = [1 + sum((i + 1) * ord(ch) for i, ch in enumerate(w)) % (self.vocab - 1) for w in words]
        return ids + [0] * (self.length - len(ids))

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"context": self.table[torch.tensor([self.ids(p) for p in prompts])]}
