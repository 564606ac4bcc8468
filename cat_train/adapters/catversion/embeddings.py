"""The trained tensors: Keys and Values per chosen layer, in the projected space."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .spec import CatVersionSpec, find_self_attention, heads_of, hidden_of, resolve_layers


class KVEmbeddings(nn.Module):
    """Keys and Values concatenated per layer, in the projected space: keys/values (n_layers, length, hidden)."""

    def __init__(self, layers: Sequence[int], length: int, hidden: int, heads: int, total_layers: int,
                 prefix_bias: float = 0.0):
        super().__init__()
        self.prefix_bias = float(prefix_bias)
        self.layer_indices = tuple(int(i) for i in layers)
        self.hidden, self.heads, self.total_layers, self.length = hidden, heads, total_layers, length
        self.keys = nn.Parameter(torch.zeros(len(self.layer_indices), length, hidden))
        self.values = nn.Parameter(torch.zeros(len(self.layer_indices), length, hidden))

    def initialise(self, spec: CatVersionSpec, generator: torch.Generator | None = None) -> "KVEmbeddings":
        with torch.no_grad():
            if spec.init == "normal":
                for p in (self.keys, self.values):
                    p.copy_(torch.randn(p.shape, generator=generator) * spec.init_std)
            else:
                self.keys.zero_()
                self.values.zero_()
        return self

    def info(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "layers": self.total_layers,
                "indices": list(self.layer_indices), "length": self.length, "prefix_bias": self.prefix_bias}


def new_embeddings(encoder: nn.Module, spec: CatVersionSpec, output_layer: int | None = None,
                   generator: torch.Generator | None = None) -> KVEmbeddings:
    attn = find_self_attention(encoder)
    idx = resolve_layers(len(attn), spec.layers, output_layer)
    m = attn[idx[0]][1]
    emb = KVEmbeddings(idx, spec.length, hidden_of(m), heads_of(m), len(attn), spec.prefix_bias)
    return emb.initialise(spec, generator)


def param_count(embs: Mapping[str, KVEmbeddings]) -> int:
    return sum(p.numel() for e in embs.values() for p in e.parameters())
