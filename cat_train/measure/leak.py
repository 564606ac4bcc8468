"""Leak scan: which prompts did the adapter change? Host-agnostic half (ranking, report, chart, grid).

For each probe prompt, the base and the adapted model draw images from the same seeds; S_C is the CLIP
cosine similarity of each (base, adapted) pair. A probe's drift is 1 - mean(S_C) over its pairs: 0 when the
adapter left the prompt untouched (same seeds, same images), larger the more it moved. An arithmetic mean, as
the bench's drift: one pair that changed completely must not decide the probe's score, as it would in a
harmonic mean. The probes that drift most are the ones to add as CAT preservation prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_PROBES = "\n".join([
    "a photo of a dog", "a photo of a cat", "a photo of a person", "a photo of a woman", "a photo of a man",
    "a photo of a car", "a photo of a house", "a photo of a tree", "a bowl of fruit", "a landscape painting",
])


@dataclass(frozen=True)
class ProbeDrift:
    prompt: str
    similarity: float      # mean S_C over the probe's (base, adapted) pairs
    min_similarity: float  # its least similar pair
    n: int                 # image pairs
    index: int             # position in the probe list (ties keep this order)

    @property
    def drift(self) -> float:
        return 1.0 - self.similarity


def parse_probes(text: str) -> list[str]:
    """One prompt per line; blank lines dropped, duplicates kept once (a repeat would only cost sampling time)."""
    probes = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not probes:
        raise ValueError("probes is empty: give one prompt per line, e.g. 'a photo of a dog' (the class you trained) "
                         "and its neighbours ('a photo of a cat', 'a photo of a wolf').")
    return probes


def pair_similarities(base_emb: Tensor, adapted_emb: Tensor, n_probes: int) -> Tensor:
    """Embeddings (probes * pairs, D), probe-major, of base and adapted images -> (probes, pairs) S_C, float64.

    Uses metrics.cosine, which gives exactly 1.0 for identical rows: an untouched probe has drift exactly 0."""
    from .metrics import cosine

    if n_probes < 1 or len(base_emb) % n_probes:
        raise ValueError(f"{len(base_emb)} embeddings do not split into {n_probes} probes of equal size.")
    return cosine(base_emb, adapted_emb).view(n_probes, -1)


def rank_probes(prompts: Sequence[str], similarities: Tensor | Sequence[Sequence[float]]) -> list[ProbeDrift]:
    """similarities: (probes, pairs) S_C of the same-seed pairs -> probes ranked worst (most drift) first."""
    sims = torch.as_tensor(similarities, dtype=torch.float64)
    if sims.ndim != 2 or sims.shape[0] != len(prompts) or sims.shape[1] == 0:
        raise ValueError(f"need one row of pair similarities per probe: {len(prompts)} probes, "
                         f"got shape {tuple(sims.shape)}.")
    if bool(torch.isnan(sims).any()):
        raise ValueError("a pair similarity is NaN; check the images for NaN (a diverged sample?).")
    rows = [ProbeDrift(p, float(s.mean()), float(s.min()), len(s), i) for i, (p, s) in enumerate(zip(prompts, sims))]
    return sorted(rows, key=lambda r: (-r.drift, r.index))


NOISE_DRIFT = 1e-4  # the report's last digit: a drift below it is shown as 0.0000, and is a GPU's rounding, not a leak


def worst_probes(ranked: Sequence[ProbeDrift], k: int, min_drift: float = NOISE_DRIFT) -> list[str]:
    """The top-k drifting prompts; only those that drifted more than min_drift (an untouched prompt needs no
    preservation, so with base == adapted the list is empty, and so it is when every drift reads 0.0000: a GPU's
    nondeterministic sampling left 1e-7 drifts that were recommended as leaks)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}.")
    return [r.prompt for r in ranked if r.drift > min_drift][:k]


def report(ranked: Sequence[ProbeDrift], worst: Sequence[str]) -> str:
    n = ranked[0].n if ranked else 0
    lines = [f"Leak scan: drift = 1 - CLIP similarity of base and adapted images from the same seeds "
             f"({n} pair(s) per probe), worst first.",
             f"{'rank':>4}  {'drift':>7}  {'similarity':>10}  {'min pair':>8}  probe"]
    lines += [f"{i:>4}  {r.drift:>7.4f}  {r.similarity:>10.4f}  {r.min_similarity:>8.4f}  {r.prompt}"
              for i, r in enumerate(ranked, 1)]
    if worst:
        lines.append(f"{len(worst)} most drifting (add them to CAT Loss Config's preservation prompts and retrain):")
        lines += [f"  {p}" for p in worst]
    elif ranked and ranked[0].drift > 0:
        lines.append(f"No probe drifted by {NOISE_DRIFT} or more (the adapted MODEL draws what the base draws, up to "
                     "rounding): nothing to add to the preservation prompts.")
    else:
        lines.append("No probe drifted: the adapted MODEL draws exactly what the base draws for every probe "
                     "(is a LoRA applied to it?).")
    return "\n".join(lines)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font that keeps spaces
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, max_w: float) -> str:
    if draw.textlength(text, font=font) <= max_w:
        return text
    while text and draw.textlength(text + "…", font=font) > max_w:
        text = text[:-1]
    return text + "…"


def chart(ranked: Sequence[ProbeDrift], worst: Sequence[str] = (), width: int = 760):
    """Horizontal bars of drift per probe, worst on top; bars of the `worst` probes in red. A PIL image."""
    from PIL import Image, ImageDraw

    font, row_h, top, pad = _font(14), 24, 44, 10
    height = top + row_h * len(ranked) + pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    label_w = min(width * 0.45, max(d.textlength(r.prompt, font=font) for r in ranked) + 8)
    bar_x0, bar_x1 = pad + label_w, width - pad - 60
    scale = max(max(r.drift for r in ranked), 1e-3)  # longest bar = worst drift; all-zero drifts draw no bars
    d.text((pad, 6), "drift = 1 - CLIP similarity, base vs adapted (same seeds)", font=font, fill=(0, 0, 0))
    d.text((pad, 24), f"red: the {len(worst)} to preserve" if worst else "no probe drifted", font=font,
           fill=(90, 90, 90))
    bad = set(worst)
    for i, r in enumerate(ranked):
        y = top + i * row_h
        d.text((pad, y + 4), _fit(d, r.prompt, font, label_w - 8), font=font, fill=(0, 0, 0))
        x = bar_x0 + (bar_x1 - bar_x0) * max(0.0, r.drift) / scale
        if x > bar_x0:
            d.rectangle([bar_x0, y + 4, x, y + row_h - 4], fill=(214, 60, 60) if r.prompt in bad else (110, 140, 200))
        d.text((max(x, bar_x0) + 6, y + 4), f"{r.drift:.3f}", font=font, fill=(0, 0, 0))
    return img


def grid(ranked: Sequence[ProbeDrift], base: Sequence[Tensor], adapted: Sequence[Tensor], gap: int = 8):
    """One image: a row per probe (ranked order), its base images left and adapted images right, a label above.

    base[i] / adapted[i] are the (N, H, W, 3) float images of probe i in the *probe list* order (ProbeDrift.index).
    Returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    n, h, w, _ = base[0].shape
    font, label_h = _font(14), 22
    row_w = 2 * n * w + gap
    canvas = Image.new("RGB", (row_w, label_h + len(ranked) * (label_h + h)), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((4, 3), "base", font=font, fill=(0, 0, 0))
    d.text((n * w + gap + 4, 3), "adapted", font=font, fill=(0, 0, 0))
    for row, r in enumerate(ranked):
        y = label_h + row * (label_h + h)
        label = _fit(d, f"{row + 1}. drift {r.drift:.3f}  {r.prompt}", font, row_w - 8)
        d.text((4, y + 3), label, font=font, fill=(0, 0, 0))
        for j, side in enumerate((base[r.index], adapted[r.index])):
            if tuple(side.shape) != (n, h, w, 3):
                raise ValueError(f"probe {r.prompt!r}: images of shape {tuple(side.shape)}, expected {(n, h, w, 3)}.")
            arr = (side.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            for k in range(n):
                canvas.paste(Image.fromarray(arr[k], "RGB"), (j * (n * w + gap) + k * w, y + label_h))
    return canvas
