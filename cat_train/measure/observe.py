"""Looking at the model from inside training without changing what training does next.

A preview or a validation pass runs between two optimizer steps, on the very module being trained. It
must leave behind exactly what it found: no gradients (no_grad), no dropout draw from the global RNG
(eval mode, and the RNG state forked so even a host model that draws anyway cannot shift the stream),
and every submodule's train/eval flag as it was (restored one by one, not with a blanket `.train()`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def observing(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        module.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training
