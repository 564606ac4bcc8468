"""Horizontal flips of the training images: CatVersion's data pipeline, as a batch term its trainer adds."""
from __future__ import annotations

import torch
from torch import Tensor

from ..step.denoiser import Denoiser
from ..step.plugs import BatchTerm


class Flip(BatchTerm):
    """Horizontal flips of the training images with probability p (CatVersion's data pipeline). One draw per sample
    every batch from the run's generator, flipped or not, so resumes stay exact. In an image space when the denoiser
    names one (`augment_space`, as APT's augmentation), otherwise on the latent (SD's VAE: close to the image's
    flip)."""

    name = "flip"

    def __init__(self, denoiser: Denoiser, p: float):
        self.p, self.space = p, getattr(denoiser, "augment_space", None)

    def augment(self, x0: Tensor, t: Tensor, gen: torch.Generator) -> Tensor:
        flip = (torch.rand(x0.shape[0], generator=gen) < self.p).to(x0.device)
        if not bool(flip.any()):
            return x0
        img = self.space[0](x0) if self.space else x0
        out = self.space[1](img.flip(-1)) if self.space else img.flip(-1)
        return torch.where(flip[:, None, None, None], out, x0)
