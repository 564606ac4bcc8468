"""A kohya-style image folder encoded once with the graph's VAE and CLIP.

Folder: images with same-name caption files (`a.png` + `a.txt`); subfolders named `N_name` repeat
their images N times per epoch. Buckets: each image is resized to about resolution^2 pixels at its
own aspect ratio, sides multiples of 64; without buckets it is centre-cropped to a square.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cat_train.prompts import ensure_trigger, triggers_in

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def find_images(root: Path, caption_ext: str) -> list[tuple[Path, str, int]]:
    rows = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXT or not p.is_file():
            continue
        m = re.match(r"^(\d+)_", p.parent.name) if p.parent != root else None
        cap_file = p.with_suffix(caption_ext if caption_ext.startswith(".") else "." + caption_ext)
        caption = cap_file.read_text(encoding="utf-8").strip() if cap_file.exists() else ""
        rows.append((p, caption, int(m.group(1)) if m else 1))
    return rows


def bucket_size(w: int, h: int, res: int, step: int = 64) -> tuple[int, int]:
    scale = math.sqrt(res * res / (w * h))
    return max(step, round(w * scale / step) * step), max(step, round(h * scale / step) * step)


def load_image(path: Path, res: int, buckets: bool) -> torch.Tensor:
    """(1, H, W, 3) float in [0, 1], ComfyUI's IMAGE layout."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    tw, th = bucket_size(w, h, res) if buckets else (res, res)
    s = max(tw / w, th / h)  # cover the target, then centre-crop the overflow
    img = img.resize((max(tw, round(w * s)), max(th, round(h * s))), Image.LANCZOS)
    left, top = (img.width - tw) // 2, (img.height - th) // 2
    img = img.crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


@dataclass
class CatDataset:
    """What CAT Dataset passes to the trainer: cached latents plus a memoised caption encoder."""
    items: list[tuple[torch.Tensor, str, tuple[str, ...], int]]  # (latent (C,H,W), caption y_T, triggers, repeats)
    triggers: tuple[str, ...]
    class_word: str
    clip: object
    source: str
    _text_cache: dict = field(default_factory=dict, repr=False)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batched {"context": (B,L,C), "pooled": (B,P)}; each prompt goes through CLIP once per dataset."""
        for p in prompts:
            if p not in self._text_cache:
                cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(p))
                ctx, extra = cond[0][0], cond[0][1]
                pooled = extra.get("pooled_output")
                self._text_cache[p] = (ctx[0].detach().float().cpu().clone(),
                                       None if pooled is None else pooled[0].detach().float().cpu().clone())
        rows = [self._text_cache[p] for p in prompts]
        lengths = {r[0].shape[0] for r in rows}
        if len(lengths) > 1:  # long captions make more 77-token chunks; pad so prompts stack
            n = max(lengths)
            rows = [(torch.cat([c, c[-1:].expand(n - c.shape[0], -1)]) if c.shape[0] < n else c, pl) for c, pl in rows]
        out = {"context": torch.stack([r[0] for r in rows])}
        if rows[0][1] is not None:
            out["pooled"] = torch.stack([r[1] for r in rows])
        return out

    @property
    def buckets(self) -> dict[tuple[int, int], int]:
        b: dict[tuple[int, int], int] = {}
        for lat, *_ in self.items:
            key = (lat.shape[-1] * 8, lat.shape[-2] * 8)
            b[key] = b.get(key, 0) + 1
        return b


def build_dataset(folder: Path, vae, clip, triggers: tuple[str, ...], class_word: str, caption_ext: str,
                  res: int, buckets: bool, where: str = "prepend") -> CatDataset:
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} does not exist; put images (and same-name .txt captions) "
                         "in a subfolder of ComfyUI's input folder and give its name, or give a full path.")
    rows = find_images(folder, caption_ext)
    if not rows:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXT))}) in {folder}.")
    if not triggers:
        raise ValueError("give at least one trigger token (e.g. 'sks'); CAT needs it to tell y_T from y.")
    items = []
    for path, caption, repeats in rows:
        found = triggers_in(caption, triggers)
        if not found:  # captionless or trigger-less images get the first trigger
            caption, found = ensure_trigger(caption or (class_word or ""), triggers[0], where), (triggers[0],)
        pixels = load_image(path, res, buckets)
        latent = vae.encode(pixels[:, :, :, :3])
        items.append((latent[0].detach().float().cpu().clone(), caption, found, repeats))
    return CatDataset(items, tuple(triggers), class_word, clip, str(folder))
