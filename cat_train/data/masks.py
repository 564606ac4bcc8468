"""Masks of masked training as the dataset reads them (cat_train/terms/mask.py is the term that weighs them).

A mask file beside the image named as OneTrainer names them, `a-masklabel.png` for `a.png` (white = subject, black =
background, grey between), or else the image's own alpha channel (kohya's `alpha_mask`); brought to the image's
bucket as the image is, then averaged down to the latent (`latent_mask`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .images import IMAGE_EXTS, DatasetError, _cover, _flatten, _has_alpha, _open, _to_8bit

MASK_SUFFIX = "-masklabel"  # OneTrainer's: a.png's mask is a-masklabel.png
MaskSource = Literal["off", "auto", "file", "alpha"]
MASK_SOURCES = ("off", "auto", "file", "alpha")


class MaskError(DatasetError):
    """A mask file that cannot be used beside a good image: the image is not dropped for it (it trains without a
    mask while masked training is off; a host refuses the run when masked training is on)."""

    def __init__(self, message: str, mask_file: Path):
        super().__init__(message)
        self.mask_file = mask_file


def is_mask_file(p: Path) -> bool:
    return p.stem.lower().endswith(MASK_SUFFIX)


def mask_file_of(path: Path) -> Path | None:
    """`a-masklabel.png` (or another image extension, PNG first) beside `a.jpg`."""
    for ext in (".png",) + tuple(e for e in IMAGE_EXTS if e != ".png"):
        for cand in (path.with_name(path.stem + MASK_SUFFIX + ext),
                     path.with_name(path.stem + MASK_SUFFIX + ext.upper())):
            if cand.is_file():
                return cand
    return None


def check_mask_source(masks: str) -> None:
    if masks not in MASK_SOURCES:
        raise DatasetError(f"masks must be one of {', '.join(MASK_SOURCES)} (auto: a <name>{MASK_SUFFIX}.png file, "
                           f"else the alpha channel), got {masks!r}.")


def load_mask(path: Path, mask_file: Path | None, masks: str) -> tuple[Image.Image, Image.Image | None]:
    """The image (as load_image gives it) and its mask ("L", the image's size), or None where it has none: the mask
    file when `masks` is auto or file, else (auto, alpha) the image's alpha channel."""
    img = _open(path)
    mask = None
    if masks in ("auto", "file") and mask_file is not None:
        try:
            m = _open(mask_file)
        except DatasetError as e:
            cause = e.__cause__
            why = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
            raise MaskError(f"mask {mask_file} cannot be read ({why}); re-save it as a greyscale PNG at its image's "
                            f"size ({img.width}x{img.height}), or remove it", mask_file) from None
        mask = _to_8bit(m) if m.mode in ("I", "I;16", "I;16B", "I;16L", "F") else m.convert("L")
        if in_colour(m):
            mask.info["cat_colour"] = True  # DatasetPlan.decode names it: luminance is not what the user meant
        if mask.size != img.size:
            raise MaskError(f"mask {mask_file} is {mask.width}x{mask.height} but its image {path.name} is "
                            f"{img.width}x{img.height}; save the mask at the image's size", mask_file)
    elif masks in ("auto", "alpha") and _has_alpha(img):
        alpha = img.convert("RGBA").getchannel("A")
        mask = alpha if alpha.getextrema()[0] < 255 else None  # all opaque: no mask
    return _flatten(img), mask


def in_colour(img: Image.Image) -> bool:
    """Whether a mask file's pixels have colour (red, green and blue not all equal): converted to grey by luminance,
    pure red weighs 0.30 of white."""
    if img.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return False
    r, g, b = (np.asarray(c, dtype=np.int16) for c in img.convert("RGB").split())
    return bool((r != g).any() or (g != b).any())


COLOUR_NOTE = ("read as grey by luminance (pure red weighs 0.30 of white, green 0.59, blue 0.11); save masks as "
               "greyscale, white = subject, black = background")


def fit_mask_to(mask: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A mask ("L") resized and cropped as fit_to does its image -> (h, w) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(_cover(mask, size), dtype=np.float32) / 255.0)


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask (H, W) or (1, H, W) in [0, 1] averaged down to the latent's (h, w): each latent element weighs as
    much as the share of its pixels that are subject (area interpolation, the pixels it encodes)."""
    m = mask.float().reshape(1, 1, *mask.shape[-2:])
    return torch.nn.functional.interpolate(m, size=tuple(size), mode="area")[0].clamp(0, 1)
