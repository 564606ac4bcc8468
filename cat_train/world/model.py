"""The world's base text-to-image model: an SD-shaped UNet over a fixed 'latent', plus its text encoder.

The latent is space-to-depth of the 32 px image (pixel_unshuffle by 2: (3, 32, 32) -> (12, 16, 16)), an
exactly invertible stand-in for SD's VAE that makes every UNet pass 4x cheaper on CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from ..step.denoiser import ModuleDenoiser, NoiseSchedule
from ..adapters.export import read_safetensors
from .unet import UNet
from .text import DIM, WorldTextEncoder

HERE = Path(__file__).resolve().parent
BASE_WEIGHTS = HERE / "base.safetensors"
CONFIG = dict(in_channels=12, out_channels=12, model_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2),
              transformer_depth=(0, 1, 1), context_dim=DIM, num_heads=4, use_linear_in_transformer=False)
LATENT_SHAPE = (12, 16, 16)


def encode(img: Tensor) -> Tensor:
    """(B, 3, 32, 32) in [-1, 1] -> (B, 12, 16, 16)."""
    return F.pixel_unshuffle(img, 2)


def decode(z: Tensor) -> Tensor:
    return F.pixel_shuffle(z, 2).clamp(-1, 1)


def build() -> tuple[UNet, WorldTextEncoder]:
    return UNet(**CONFIG), WorldTextEncoder()


def load_base(path: str | Path = BASE_WEIGHTS) -> tuple[ModuleDenoiser, WorldTextEncoder]:
    """The pretrained world model as a Denoiser (v or eps prediction as its metadata says, SD's schedule) and its
    frozen text encoder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m cat_train.world.pretrain`.")
    state, metadata = read_safetensors(path)
    unet, text = build()
    unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    text.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("text.")})
    for m in (unet, text):
        m.eval().requires_grad_(False)
    return ModuleDenoiser(unet, metadata.get("prediction", "eps"), NoiseSchedule.scaled_linear()), text
