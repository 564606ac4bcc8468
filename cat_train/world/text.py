"""The world's text encoder: a word-level tokenizer and a 2-layer transformer, context (B, L, C).

The vocabulary is the world's words; any other word (a trigger such as "sks") hashes into one of
SPARE reserved ids whose embeddings were never trained on, so a new word gets its own token that
the base model has no meaning for: the same situation as a rare token in CLIP's vocabulary.
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from .generator import BACKGROUNDS, COLOURS, SHAPES

WORDS = ("<pad>", "a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS)
SPARE, LENGTH, DIM = 16, 8, 64


def token_ids(prompt: str) -> list[int]:
    ids = []
    for w in prompt.lower().replace(",", " ").split()[:LENGTH]:
        ids.append(WORDS.index(w) if w in WORDS else len(WORDS) + zlib.crc32(w.encode()) % SPARE)
    return ids + [0] * (LENGTH - len(ids))


class WorldTextEncoder(nn.Module):
    def __init__(self, dim: int = DIM, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(len(WORDS) + SPARE, dim)
        self.pos = nn.Parameter(torch.randn(LENGTH, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm(self.body(self.tok(ids) + self.pos))

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The core's `encode_text`: prompts -> {"context": (B, LENGTH, DIM)}."""
        dev = self.pos.device
        return {"context": self(torch.tensor([token_ids(p) for p in prompts], device=dev))}
