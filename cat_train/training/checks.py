"""Checks of what a user types, made before any model work starts, with errors that name the field,
the line and the fix. Host-agnostic: the nodes call these, so does any script."""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .config import CatLossConfig
from ..data.prompts import preservation_prompt, triggers_in

TOKEN_WEIGHTS_FORMAT = "one 'token=weight' per line (or comma separated), e.g. 'sks=1.5'"


def parse_token_weights(text: str, field: str = "token_weights") -> dict[str, float]:
    """'sks=1.5, zwx=0.5' or one 'token=weight' per line -> {'sks': 1.5, 'zwx': 0.5}."""
    weights: dict[str, float] = {}
    for ln, line in enumerate(text.splitlines(), 1):
        for entry in (e for e in line.split(",") if e.strip()):
            tok, sep, value = (x.strip() for x in entry.partition("="))
            where = f"{field} line {ln} ({entry.strip()!r})"
            if not sep or not tok or not value:
                raise ValueError(f"{where} must look like 'sks=1.5': {TOKEN_WEIGHTS_FORMAT}.")
            try:
                w = float(value)
            except ValueError:
                raise ValueError(f"{where}: weight {value!r} is not a number; {TOKEN_WEIGHTS_FORMAT}.") from None
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"{where}: weight {value} must be a finite number >= 0 (0 turns the CAT term off for "
                                 "that token; 1 is the default).")
            if tok in weights:
                raise ValueError(f"{where}: token {tok!r} is given twice; keep one weight per token.")
            weights[tok] = w
    return weights


def check_concepts(triggers: Sequence[str], loss_cfg: CatLossConfig) -> None:
    """Refuse a trigger/loss-config pair that cannot train what the user means, before training starts.

    - a token weight for a token that is no trigger of the dataset would silently apply to nothing;
    - with preservation 'class', a trigger equal to its class word makes the preservation prompt y equal
      the training caption y_T, so the CAT term compares a prompt with itself and protects nothing
      (given preservation prompts replace that y, so then the class word does not matter).
    """
    triggers = tuple(t.strip() for t in triggers if t.strip())
    unknown = [t for t in loss_cfg.token_weights if t not in triggers]
    if unknown:
        raise ValueError(f"token_weights names {', '.join(repr(t) for t in unknown)}, which "
                         f"{'is not a trigger' if len(unknown) == 1 else 'are not triggers'} of the dataset "
                         f"(triggers: {', '.join(triggers) or 'none'}); a weight applies to a trigger token only: "
                         "fix the spelling or remove the line.")
    if loss_cfg.alpha > 0 and loss_cfg.preservation == "class" and not getattr(loss_cfg, "preservation_prompts", ()):
        for t in triggers:
            y = preservation_prompt(f"a photo of {t}", [t], "class", loss_cfg.class_word)
            if y.strip().lower() == f"a photo of {t}".lower():
                raise ValueError(f"trigger {t!r} equals the class word {y.split()[-1]!r}: the prompt without the "
                                 "trigger (y) would equal the training caption (y_T), so the CAT term would compare a "
                                 "prompt with itself and preserve nothing. Use a token the model does not know as the "
                                 f"trigger (e.g. 'sks') and keep {t!r} as the class word.")
    check_prompts_without_trigger(triggers, loss_cfg.preservation_prompts, "preservation prompt")
    auto = loss_cfg.auto
    if auto.active and auto.source == "list":
        check_prompts_without_trigger(triggers, auto.probes, "auto preservation probe")
        word = loss_cfg.class_word if loss_cfg.preservation == "class" else ""
        if isinstance(word, str) and word and all(p == word for p in auto.probes):
            raise ValueError(f"auto preservation's only probe is the class word {word!r}, which y already preserves: "
                             "an image is never probed with its own class word, so nothing would be measured. Give its "
                             "neighbours as probes instead (e.g. for 'dog': cat, wolf, puppy), or source `common`.")


def check_prompts_without_trigger(triggers: Sequence[str], prompts: Sequence[str], what: str) -> None:
    """Prompts the CAT term or a measurement holds at the base model must not hold a trigger: the term would pull
    the trigger back to the base (fighting the fit), a drift measured on it is the fit, not a leak."""
    for p in prompts:
        found = triggers_in(p, [t for t in triggers if t.strip()])
        if found:
            raise ValueError(f"{what} {p!r} holds the trigger {found[0]!r}: it would be held at the base model, "
                             "undoing what the LoRA learns for the trigger. Write it without the trigger (e.g. "
                             f"{preservation_prompt(p, found, 'strip')!r}); the training captions are y_T already.")


def check_masks(mask_problems: Sequence[str], loss_cfg: CatLossConfig) -> None:
    """Masked training on (mask_floor < 1 or mask_keep > 0) with mask files the dataset could not use: those images
    would train unmasked beside masked ones. Off, the dataset's note says they are not used, and training goes on."""
    if mask_problems and loss_cfg.mask.active:
        more = f" (and {len(mask_problems) - 3} more)" if len(mask_problems) > 3 else ""
        raise ValueError(f"masked training is on (mask_floor {loss_cfg.mask.floor}, mask_keep {loss_cfg.mask.keep}) "
                         f"but {len(mask_problems)} mask file(s) cannot be used: {'; '.join(mask_problems[:3])}{more}. "
                         "Fix or remove those files, or set mask_floor 1 and mask_keep 0 to train without masks.")


def check_image_batch(images, what: str) -> None:
    """Images to score, (B, H, W, C) in [0, 1]: refuse NaN/inf pixels and blank images (all one value, e.g. all
    black), which CLIP embeds as near-identical points and would score as a meaningful KPS/IS (0 or 1)."""
    import torch

    flat = torch.as_tensor(images).reshape(len(images), -1)
    for i, row in enumerate(flat):
        if not bool(torch.isfinite(row).all()):
            raise ValueError(f"{what} image {i + 1} of {len(flat)} holds NaN/inf pixels (a diverged sample or a failed "
                             "decode?); regenerate it (lower the LoRA strength or the CFG) before scoring.")
        if float(row.max() - row.min()) == 0.0:
            raise ValueError(f"{what} image {i + 1} of {len(flat)} is blank (every pixel {float(row[0]):.3g}, e.g. all "
                             "black from a NaN-filtered decode or a safety checker); regenerate it before scoring: a "
                             "blank image gives a meaningless score.")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (not the whole usage block) and exits 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (--help lists the options)", file=sys.stderr)
        raise SystemExit(2)


def _whole(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        v = least - 1
    if v < least:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {least}")
    return v


def positive_int(text: str) -> int:
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    return _whole(text, 0)


def _finite_float(text: str, ok, bound: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and ok(v)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number {bound}")
    return v


def positive_float(text: str) -> float:
    return _finite_float(text, lambda v: v > 0, "> 0")


def non_negative_float(text: str) -> float:
    return _finite_float(text, lambda v: v >= 0, ">= 0")


def output_folder(text: str) -> Path:
    """A folder that can be created (or exists) and written to; checked before any work, created by the caller."""
    p = Path(text).expanduser()
    q = p.absolute()
    while not q.exists():  # the nearest existing ancestor decides
        q = q.parent
    if not q.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be a folder: {q} is a file; choose another output folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: no permission to write in {q}; choose another output folder")
    try:  # permissions do not tell everything (root in /proc, a read-only mount): try, and leave nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".cat-probe-", dir=q))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot create folders in {q} ({e.strerror}); choose another "
                                         "output folder") from None
    return p
