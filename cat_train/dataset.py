"""Kohya-style image folders: captions, trigger insertion, aspect buckets, robust image decoding.

    root/10_sks dog/a.png + a.txt    -> repeats 10; caption from a.txt, else the folder's "sks dog"
    root/b.jpg                       -> repeats 1; caption from b.txt, else "<trigger> <class word>"

Images come out as float tensors (3, H, W) in [-1, 1] at their bucket size; the caller encodes them
(VAE) once. Repeats are kept as sampling weights, not copies.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .checks import check_trigger_not_class_word
from .prompts import ensure_trigger, parse_class_words, triggers_in

log = logging.getLogger("cat_train")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
Insert = Literal["prepend", "append", "off"]
# Smaller sides are upscaled many times to reach a bucket: the VAE then encodes blur, and with 8 px per
# latent pixel the subject spans a handful of latents. Warned about, not refused: it may be intended.
MIN_SIDE = 64


class DatasetError(ValueError):
    pass


@dataclass
class ImageRecord:
    path: Path
    caption: str
    triggers: tuple[str, ...]
    repeats: int
    caption_file: Path | None = None
    caption_encoding: str | None = None  # the legacy encoding a non-UTF-8 caption file was read with


def read_caption(path: Path) -> tuple[str, str | None]:
    """The caption file's text, and the legacy encoding used when it is not UTF-8 (else None).

    Captions written on Windows are often Windows-1252 ('café' as b'caf\\xe9'); every byte sequence is
    readable that way or as Latin-1, so a caption is never lost to a decode error, and the caller warns.
    """
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's "Unicode": UTF-16 with a byte-order mark
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError as e:
            raise DatasetError(f"caption file {path} starts like UTF-16 but does not decode ({e.reason} at byte "
                               f"{e.start}); re-save it as UTF-8.") from None
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined
        return data.decode("latin-1"), "Latin-1"


def legacy_caption_note(records: Sequence[ImageRecord]) -> str | None:
    legacy = [r for r in records if r.caption_encoding]
    if not legacy:
        return None
    listed = ", ".join(f"{r.caption_file} ({r.caption_encoding}: {r.caption!r})" for r in legacy[:5])
    more = f" and {len(legacy) - 5} more" if len(legacy) > 5 else ""
    return (f"{len(legacy)} caption file(s) are not UTF-8 and were read as a legacy Windows encoding: {listed}{more}; "
            "if a letter looks wrong, re-save the file as UTF-8.")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def scan_folder(root: str | Path, triggers: Sequence[str], class_word: str = "", caption_ext: str = ".txt",
                insert_trigger: Insert = "prepend") -> list[ImageRecord]:
    root = Path(root).expanduser()
    triggers = tuple(t.strip() for t in triggers)
    if not triggers or not all(triggers):
        raise DatasetError("give at least one non-empty trigger token (e.g. 'sks'); CAT needs it to tell y_T from y.")
    try:  # 'dog' for every trigger, or one word per trigger ('sks=dog, zwx=cat')
        words = parse_class_words(class_word)
        if isinstance(words, dict):
            for t, w in words.items():
                check_trigger_not_class_word([t], w)
            class_word = words.get(triggers[0], "")
        else:
            check_trigger_not_class_word(triggers, words)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; create it and put the training "
                           "images (with same-name .txt captions) in it.")
    ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    groups: list[tuple[Path, int, str]] = [(root, 1, "")]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = re.match(r"^(\d+)_(.*)$", sub.name)
        if m and int(m.group(1)) > 0:
            groups.append((sub, int(m.group(1)), m.group(2).strip()))
        else:
            log.warning("ignoring folder %s: kohya repeat folders are named 'N_name' (e.g. '10_sks dog')", sub)
    records = []
    for folder, repeats, name in groups:
        for path in _images(folder):
            cap_file = path.with_suffix(ext)
            raw, encoding = read_caption(cap_file) if cap_file.is_file() else ("", None)
            text = " ".join(raw.split())
            caption = text or name or " ".join(w for w in (triggers[0], class_word.strip()) if w)  # empty file = none
            if not triggers_in(caption, triggers):
                if insert_trigger == "off":
                    raise DatasetError(f"caption of {path} has no trigger {list(triggers)}: {caption!r}; add the token "
                                       f"to {cap_file.name} or turn trigger insertion on ('prepend' or 'append').")
                own = triggers_in(name, triggers)
                caption = ensure_trigger(caption, own[0] if own else triggers[0], insert_trigger)
            records.append(ImageRecord(path, caption, triggers_in(caption, triggers), repeats,
                                       cap_file if cap_file.is_file() else None, encoding))
    if not records:
        raise DatasetError(f"no images in {root} or its 'N_name' subfolders; accepted: {', '.join(IMAGE_EXTS)}.")
    note = legacy_caption_note(records)
    if note:
        log.warning(note)
    return records


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
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e}); re-save it as PNG or JPEG, or remove it.") from e
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


def fit_to(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover (w, h), centre-crop, -> (3, h, w) float32 in [-1, 1]."""
    tw, th = size
    s = max(tw / img.width, th / img.height)
    img = img.resize((max(tw, round(img.width * s)), max(th, round(img.height * s))), Image.LANCZOS)
    left, top = (img.width - tw) // 2, (img.height - th) // 2
    a = np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0


@dataclass
class DatasetItem:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    triggers: tuple[str, ...]
    repeats: int
    path: Path


@dataclass
class Dataset:
    items: list[DatasetItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also logged; for a host to show beside the summary

    @property
    def buckets(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for it in self.items:
            key = (it.pixels.shape[-1], it.pixels.shape[-2])
            out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        b = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        s = f"{len(self.items)} images, {len(self.buckets)} bucket{'s' * (len(self.buckets) != 1)} ({b})"
        return s + (f", {len(self.skipped)} skipped" if self.skipped else "")


def load_dataset(root: str | Path, triggers: Sequence[str], class_word: str = "", caption_ext: str = ".txt",
                 insert_trigger: Insert = "prepend", resolution: int = 512, buckets: bool = True,
                 bucket_step: int = 64) -> Dataset:
    records = scan_folder(root, triggers, class_word, caption_ext, insert_trigger)
    sizes = make_buckets(resolution, bucket_step) if buckets else [(resolution, resolution)]
    items, skipped, small = [], [], []
    for r in records:
        try:
            img = load_image(r.path)
        except DatasetError as e:
            skipped.append((r.path, str(e)))
            continue
        if min(img.size) < MIN_SIDE:
            small.append(f"{r.path.name} ({img.width}x{img.height})")
        items.append(DatasetItem(fit_to(img, nearest_bucket(img.width, img.height, sizes)), r.caption, r.triggers,
                                 r.repeats, r.path))
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(str(p) for p, _ in skipped))
    if not items:
        raise DatasetError(f"no readable image in {root}; all {len(skipped)} failed to decode: "
                           + "; ".join(f"{p.name}: {why}" for p, why in skipped))
    warnings = [n for n in [legacy_caption_note(records)] if n]
    if small:
        warnings.append(f"{len(small)} image(s) in {root} are smaller than {MIN_SIDE} px on a side: "
                        f"{', '.join(small[:5])}{f' and {len(small) - 5} more' if len(small) > 5 else ''}; they are "
                        f"upscaled to a bucket of about {resolution} px and teach mostly blur: use larger images or remove them.")
        log.warning(warnings[-1])
    return Dataset(items, skipped, warnings)


__all__ = ["DatasetError", "Dataset", "DatasetItem", "ImageRecord", "IMAGE_EXTS", "MIN_SIDE", "fit_to", "load_dataset",
           "load_image", "make_buckets", "nearest_bucket", "read_caption", "scan_folder"]
