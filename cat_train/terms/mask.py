"""Masked training: the fit term weighted per latent element by the image's mask, and the background kept.

Each `train.Example` may carry a mask (1, h, w) at its latent's size, 1 on the subject and 0 on the background (the
dataset reads mask files or alpha channels: cat_train/data/dataset.py). Per latent element the fit's weight is

    w = m + floor * (1 - m)          (1 on the subject, `floor` on the background; exactly 1 where m = 1)

and the fit becomes its weighted mean, sum(w * d²) / sum(w), so its scale does not depend on how much of the image
the subject covers. The "inverted-mask prior" (ai-toolkit's name) is, for CAT, a keep term on the background: the
adapted prediction on the caption y_T is pulled to the frozen model's prediction on the same y_T and the same noisy
latent, outside the mask,

    keep_bg = mean over elements of (1 - m) * ||eps_θ(z_t, t, y_T) - eps_θ'(z_t, t, y_T)||²,   loss += keep * keep_bg

from the frozen y_T pass that APT asks for too (`LossTerm.needs_frozen_token_pass`): no forward pass of its own.
Examples without a mask weigh every element 1 and have no background. Off (floor 1, keep 0) the term is not built
and the run is bit for bit the unmasked one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..step.plugs import BatchTerm, LossTerm, RunHook

log = logging.getLogger("cat_train")


@dataclass(frozen=True)
class MaskSettings:
    """`CatLossConfig.mask_floor` and `mask_keep` as the step-term registry sees them (CatLossConfig.mask)."""
    floor: float = 1.0
    keep: float = 0.0

    def __post_init__(self):
        check_settings(self.floor, self.keep)

    @property
    def active(self) -> bool:
        return self.floor < 1.0 or self.keep > 0.0

    def metadata(self, history: Sequence[dict] = ()) -> dict[str, str]:
        return {"cat_mask_floor": str(self.floor), "cat_mask_keep": str(self.keep)}

    def build(self, denoiser, adapter=None) -> "MaskedLoss":
        return MaskedLoss(denoiser, self)


def check_settings(floor: float, keep: float) -> None:
    if not 0.0 <= floor <= 1.0:  # also catches NaN
        raise ValueError(f"mask_floor (the fit weight of the background) must be in [0, 1] (1 = masks off; "
                         f"OneTrainer's default 0.1), got {floor}.")
    if not keep >= 0.0:
        raise ValueError(f"mask_keep (the weight of the background keep term) must be >= 0 (0 = off), got {keep}.")


def fit_weights(mask: Tensor, floor: float) -> Tensor:
    """Per-element fit weight from a mask in [0, 1]: 1 on the subject, `floor` on the background."""
    return mask + floor * (1.0 - mask)


def check_masks(masks: Sequence[Tensor | None], floor: float, names: Sequence[str] = ()) -> list[str]:
    """With mask_floor 0 an all-black mask (no subject marked) fits nothing: refused when every image has one (the LoRA
    would stay zero), a warning naming the images otherwise. names: the images', for the messages."""
    if floor > 0:
        return []
    black = [i for i, m in enumerate(masks) if m is not None and float(m.max()) == 0.0]
    if not black:
        return []
    named = ", ".join(names[i] if i < len(names) else f"image {i + 1}" for i in black[:5])
    named += f" and {len(black) - 5} more" if len(black) > 5 else ""
    if len(black) == len(masks):
        raise ValueError(f"every training image's mask is all black ({named}): nothing is marked as subject, and with "
                         "mask_floor 0 the background is not fitted either, so the LoRA would learn nothing. Masks are "
                         "white on the subject: fix the masks (a -masklabel.png saved inverted or empty?), or raise "
                         "mask_floor (e.g. 0.1).")
    return [f"{len(black)} of {len(masks)} training images have an all-black mask ({named}): with mask_floor 0 they "
            "train nothing. Masks are white on the subject: fix those masks or remove them."]


class MaskedLoss(BatchTerm, LossTerm, RunHook):
    """Weights the fit per element by the batch's masks (it sees the batch, shapes the loss) and adds the background
    keep term (reported in the history)."""

    name = "mask"

    def __init__(self, denoiser, cfg: MaskSettings):
        self.cfg = cfg
        self.needs_frozen_token_pass = cfg.keep > 0
        self.masks: list[Tensor | None] = []
        self.background: Tensor | None = None
        self.history_keys = ("background_keep",) if cfg.keep else ()
        self.last: dict = {"background_keep": 0.0} if cfg.keep else {}

    def start(self, examples: Sequence) -> None:
        for note in check_masks([getattr(e, "mask", None) for e in examples], self.cfg.floor):
            log.warning(note)
        n = sum(getattr(e, "mask", None) is not None for e in examples)
        if not n:
            log.warning("mask_floor %s / mask_keep %s are set but no training image has a mask: they change nothing. "
                        "Put <name>-masklabel.png files (white = subject) beside the images, or give them an alpha "
                        "channel.", self.cfg.floor, self.cfg.keep)

    def see_batch(self, examples) -> None:
        self.masks = [getattr(e, "mask", None) for e in examples]

    def element_weight(self, pred_token: Tensor, frozen_token: Tensor | None) -> Tensor | None:
        self.background = None
        if all(m is None for m in self.masks):
            return None
        m = torch.stack([torch.ones((1, *pred_token.shape[-2:])) if x is None else x for x in self.masks])
        m = m.to(pred_token.device, torch.float32)
        if m.shape[-2:] != pred_token.shape[-2:]:
            raise ValueError(f"a mask of {tuple(m.shape[-2:])} does not match its latent's "
                             f"{tuple(pred_token.shape[-2:])}; build masks at the latent size "
                             "(cat_train.data.masks.latent_mask).")
        if self.cfg.keep and frozen_token is not None:
            diff = (pred_token.float() - frozen_token.float()).pow(2)
            self.background = ((1.0 - m) * diff).flatten(1).mean(1)
        return fit_weights(m, self.cfg.floor)

    def penalty(self, rows: int) -> list[Tensor]:
        if self.background is None:
            self.last = {"background_keep": 0.0} if self.cfg.keep else {}
            return []
        bg = self.background.mean()
        self.last = {"background_keep": float(bg.detach())}
        return [self.cfg.keep * bg]

    def report(self) -> dict:
        return dict(self.last)
