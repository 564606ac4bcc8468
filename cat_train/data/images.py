"""Images as the dataset reads them: robust decoding (EXIF turns, 16-bit, alpha, palettes) and aspect buckets."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Pictures the decoder is not asked to read (animations, vector art, camera and phone formats): named as skipped,
# so a user who put them in the folder learns why they were not trained on.
UNSUPPORTED_EXTS = (".gif", ".heic", ".heif", ".avif", ".svg", ".jxl", ".psd", ".ico", ".dng", ".cr2", ".nef", ".arw",
                    ".raw")


class DatasetError(ValueError):
    pass


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images scaled (not clipped) to 8 bits."""
    a = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        a = a.astype(np.float64) / 65535.0
    elif img.mode == "F":
        a = a.astype(np.float64) / max(1.0, float(a.max(initial=0)))
    else:
        a = a.astype(np.float64) / 255.0
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), "L")


def load_image(path: str | Path) -> Image.Image:
    """RGB with EXIF orientation applied; alpha composited on white; 16-bit and grayscale handled."""
    return _flatten(_open(Path(path)))


def _open(path: Path) -> Image.Image:
    """The decoded image with EXIF orientation applied, in its own mode."""
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as e:  # Pillow refuses > 2x MAX_IMAGE_PIXELS before decoding
        raise DatasetError(f"image {path} is too large to decode safely ({e}); downscale it (e.g. to 4096 px on the "
                           "long side; it is resized to the training resolution anyway) or remove it.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e}); re-save it as PNG or JPEG, or "
                           "remove it.") from e
    return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _flatten(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def make_buckets(resolution: int = 512, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(w, h), sides multiples of step, w*h <= resolution^2, aspect within max_aspect: for each side length
    the largest partner, so portrait and landscape buckets come in pairs."""
    area, sides = resolution * resolution, range(step, int(resolution * math.sqrt(max_aspect)) + 1, step)

    def partner(a: int) -> int:
        return min(area // a // step * step, int(a * max_aspect) // step * step)

    tall = {(w, partner(w)) for w in sides if partner(w) >= step and partner(w) * step >= w * step / max_aspect}
    wide = {(partner(h), h) for h in sides if partner(h) >= step}
    return sorted(b for b in tall | wide if max(b[0] / b[1], b[1] / b[0]) <= max_aspect)


def nearest_bucket(w: int, h: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    r = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resized to cover (w, h), centre-cropped: an image and its mask alike."""
    tw, th = size
    s = max(tw / img.width, th / img.height)
    img = img.resize((max(tw, round(img.width * s)), max(th, round(img.height * s))), Image.LANCZOS)
    left, top = (img.width - tw) // 2, (img.height - th) // 2
    return img.crop((left, top, left + tw, top + th))


def fit_to(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover (w, h), centre-crop, -> (3, h, w) float32 in [-1, 1]."""
    a = np.asarray(_cover(img, size), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0
