"""Preview images while training: the same prompts and the same noise every round, with the current adapter.

Prompts, by default (`preview_prompts`): the first caption, the same caption without its triggers, and each
preservation prompt, duplicates once. Every round samples all of them with the adapter on; `base()` samples
the prompts without a trigger once with the adapter off, so the grid shows the subject being learned next
to what became of the prompts CAT preserves. Sampling is `sampling.sample`, in the model's own prediction
space and schedule (eps, v, flow), from one noise tensor drawn once from `seed` and shared by every column:
the columns differ only by their prompt.

The grid (`grid()`, `save()`): rows are rounds ("base", "step N"), columns are prompts, a cell left grey where
a round has no image (the base row's trigger prompts). A round runs under `observe.observing` and
`adapter_switched`: it draws nothing from the training RNG and leaves modes and the adapter switch as it
found them, so training gives the same LoRA with previews on or off.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..adapters.lora import adapter_switched
from ..step.cancel import cancel_point
from ..step.conds import cat_cond
from ..step.denoiser import Cond, Denoiser
from .observe import observing
from ..data.prompts import preservation_prompt, triggers_in
from .sampling import sample

PAD, LABEL_W, LINE, HEADER_LINES = 4, 84, 13, 3
HEADER = HEADER_LINES * LINE + 2 * PAD
BLANK = (200, 200, 200)
PER_BATCH = 8  # prompts sampled at once: Cancel waits for one denoising step of at most this many


def preview_prompts(first_caption: str, triggers: Sequence[str], preservation_prompts: Sequence[str] = ()) -> list[str]:
    """The first caption, it without its triggers, then each preservation prompt; each prompt once, in that order."""
    out = [first_caption.strip(), preservation_prompt(first_caption, triggers, "strip"),
           *(p.strip() for p in preservation_prompts)]
    return list(dict.fromkeys(out))


class Previewer:
    """`previewer(step)` samples one round; `base()` the base model once; `grid()` / `save(path)` the rows so far.

    encode_text: prompts -> batched Cond (the trainer's). decode: latents (B, C, h, w) -> images (B, H, W, 3) in
    [0, 1] (ComfyUI's IMAGE layout; a VAE decode, or the world's unshuffle). latent_shape: (C, h, w).
    """

    def __init__(self, denoiser: Denoiser, encode_text: Callable[[list[str]], Cond], prompts: Sequence[str],
                 triggers: Sequence[str], latent_shape: Sequence[int], decode: Callable[[Tensor], Tensor],
                 seed: int = 0,
                 steps: int = 20, cfg: float = 3.0, negative: str = "", clip_x0: float | None = None, scale: int = 1):
        if not prompts:
            raise ValueError("no preview prompts; give at least one (the default is the first caption with and "
                             "without its trigger).")
        if scale < 1:
            raise ValueError(f"preview scale must be a whole number >= 1, got {scale}.")
        self.denoiser, self.decode, self.steps, self.cfg = denoiser, decode, steps, cfg
        self.clip_x0, self.scale = clip_x0, scale
        self.prompts = list(prompts)
        self.has_trigger = [bool(triggers_in(p, triggers)) for p in self.prompts]
        rows = [encode_text([p]) for p in self.prompts]  # one prompt per call: batching would pad short prompts
        self.cond = {k: v.detach() for k, v in cat_cond(*rows).items()}  # then to one length as the family batches
        self.uncond = {k: v.detach() for k, v in encode_text([negative]).items()} if cfg != 1.0 else None
        self.noise = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
        self.rows: list[tuple[str, list[Tensor | None]]] = []
        self.seconds: list[float] = []  # per round

    def _draw(self, which: list[int], adapter_on: bool) -> list[Tensor]:
        """PER_BATCH prompts at a time: sampling checks for Cancel once per denoising step of a batch, and a batch of
        200 prompts took 11 s a step."""
        out: list[Tensor] = []
        for j in range(0, len(which), PER_BATCH):
            out += self._draw_batch(which[j:j + PER_BATCH], adapter_on)
        return out

    def _draw_batch(self, which: list[int], adapter_on: bool) -> list[Tensor]:
        module = self.denoiser.module
        cond = {k: v[which] for k, v in self.cond.items()}
        with observing(module), adapter_switched(module, adapter_on):
            z = sample(self.denoiser, cond, self.uncond, (len(which), *self.noise.shape[1:]), steps=self.steps,
                       cfg=self.cfg,
                       noise=self.noise.repeat(len(which), *[1] * (self.noise.ndim - 1)), clip_x0=self.clip_x0)
            cancel_point()
            imgs = self.decode(z).float().cpu().clamp(0, 1)
        if imgs.ndim != 4 or imgs.shape[-1] != 3:
            raise ValueError(f"preview decode must return images (B, H, W, 3) in [0, 1], got {tuple(imgs.shape)}.")
        return list(imgs)

    def base(self) -> list[Tensor | None]:
        """The prompts without a trigger, adapter off: what the model drew before training."""
        which = [i for i, t in enumerate(self.has_trigger) if not t]
        t0 = time.perf_counter()
        drawn = dict(zip(which, self._draw(which, False))) if which else {}
        self.seconds.append(time.perf_counter() - t0)
        row = [drawn.get(i) for i in range(len(self.prompts))]
        self.rows.append(("base", row))
        return row

    def __call__(self, step: int) -> list[Tensor]:
        t0 = time.perf_counter()
        row = self._draw(list(range(len(self.prompts))), True)
        self.seconds.append(time.perf_counter() - t0)
        self.rows.append((f"step {step}", row))
        return row

    def cells(self) -> Tensor:
        """(rows, columns, H, W, 3) in [0, 1]; cells without an image are NaN."""
        like = next(im for _, row in self.rows for im in row if im is not None)
        return torch.stack([torch.stack([im if im is not None else torch.full_like(like, float("nan")) for im in row])
                            for _, row in self.rows])

    def grid(self) -> np.ndarray:
        """(H, W, 3) uint8: LABEL_W px of row labels, HEADER px of prompts, then rows x columns cells with PAD
        between."""
        from PIL import Image, ImageDraw

        from .plot import font, text
        cells = self.cells()
        r, c, h, w, _ = cells.shape
        ch, cw = h * self.scale, w * self.scale
        canvas = Image.new("RGB", (LABEL_W + c * (cw + PAD) + PAD, HEADER + r * (ch + PAD) + PAD), (255, 255, 255))
        d, f = ImageDraw.Draw(canvas), font(11)
        for j, p in enumerate(self.prompts):
            for k, line in enumerate(_wrap(d, p, f, cw)):
                text(d, (LABEL_W + PAD + j * (cw + PAD), PAD + k * LINE), line, f, (0, 0, 0))
        for i, (label, _) in enumerate(self.rows):
            y = HEADER + i * (ch + PAD)
            text(d, (PAD, y + ch // 2), label, f, (0, 0, 0), "lm")
            for j in range(c):
                cell = cells[i, j]
                x = LABEL_W + PAD + j * (cw + PAD)
                if torch.isnan(cell).any():
                    d.rectangle((x, y, x + cw - 1, y + ch - 1), fill=BLANK)
                    continue
                a = (cell.numpy() * 255).round().astype(np.uint8)
                canvas.paste(Image.fromarray(a).resize((cw, ch), Image.NEAREST), (x, y))
        return np.asarray(canvas)

    def save(self, path: str | Path) -> Path:
        from PIL import Image

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(self.grid()).save(path)
        return path


def _wrap(d, s: str, f, width: int) -> list[str]:
    """Words into at most HEADER_LINES lines of `width` px; a last line that does not fit ends in '...'."""
    lines, cur = [], ""
    gap = max(4, int(d.textlength(" ", font=f)))
    for word in s.split():
        trial = f"{cur} {word}".strip()
        if cur and d.textlength(trial, font=f) + gap * trial.count(" ") > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    lines.append(cur)
    if len(lines) > HEADER_LINES:
        lines = lines[:HEADER_LINES]
        lines[-1] = lines[-1] + "..."
    return lines
