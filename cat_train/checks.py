"""Checks of what a user types, made before any model work starts, with errors that name the field,
the line and the fix. Host-agnostic: the nodes call these, so does any script."""
from __future__ import annotations

import math
from typing import Sequence

from .loss import CatLossConfig
from .prompts import preservation_prompt

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
      the training caption y_T, so the CAT term compares a prompt with itself and protects nothing.
    """
    triggers = tuple(t.strip() for t in triggers if t.strip())
    unknown = [t for t in loss_cfg.token_weights if t not in triggers]
    if unknown:
        raise ValueError(f"token_weights names {', '.join(repr(t) for t in unknown)}, which "
                         f"{'is not a trigger' if len(unknown) == 1 else 'are not triggers'} of the dataset "
                         f"(triggers: {', '.join(triggers) or 'none'}); a weight applies to a trigger token only: "
                         "fix the spelling or remove the line.")
    if loss_cfg.alpha > 0 and loss_cfg.preservation == "class":
        for t in triggers:
            y = preservation_prompt(f"a photo of {t}", [t], "class", loss_cfg.class_word)
            if y.strip().lower() == f"a photo of {t}".lower():
                raise ValueError(f"trigger {t!r} equals the class word {y.split()[-1]!r}: the prompt without the trigger "
                                 "(y) would equal the training caption (y_T), so the CAT term would compare a prompt "
                                 "with itself and preserve nothing. Use a token the model does not know as the trigger "
                                 f"(e.g. 'sks') and keep {t!r} as the class word.")


def check_trigger_not_class_word(triggers: Sequence[str], class_word: str, field: str = "class_word") -> None:
    """A dataset whose trigger is its class word: captions 'a toy' would train the class itself."""
    same = [t for t in triggers if t.strip() and t.strip().lower() == class_word.strip().lower()]
    if same:
        raise ValueError(f"trigger {same[0]!r} is the same word as {field} {class_word.strip()!r}: the prompt without the "
                         "trigger (y) would equal the training caption (y_T), so CAT could not tell the subject from its "
                         f"class. Use a token the model does not know as the trigger (e.g. 'sks') and keep "
                         f"{class_word.strip()!r} as the class word.")
