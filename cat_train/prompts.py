"""Captions: find a trigger as a whole word, insert it, and derive the preservation prompt y from y_T."""
from __future__ import annotations

import re
from typing import Literal, Sequence

PreservationMode = Literal["empty", "strip", "class"]
_EDGE = r"\s,.;:!?()\[\]{}\"'"  # a trigger is bounded by these, the start or the end: "sks," counts, "sksdog" does not


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![^{_EDGE}]){re.escape(trigger)}(?![^{_EDGE}])")


def triggers_in(caption: str, triggers: Sequence[str]) -> tuple[str, ...]:
    return tuple(t for t in triggers if trigger_pattern(t).search(caption))


def ensure_trigger(caption: str, trigger: str, where: Literal["prepend", "append"] = "prepend") -> str:
    if trigger_pattern(trigger).search(caption):
        return caption
    if not caption.strip():
        return trigger
    return f"{trigger}, {caption.strip()}" if where == "prepend" else f"{caption.strip()}, {trigger}"


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def preservation_prompt(caption: str, triggers: Sequence[str], mode: PreservationMode, class_word: str = "") -> str:
    """y for the CAT term: '' (empty), y_T without its triggers (strip), or triggers -> class word (class).

    In class mode a trigger already followed by its class word ("sks dog") is dropped, not doubled.
    """
    if mode == "empty":
        return ""
    if mode not in ("strip", "class"):
        raise ValueError(f"unknown preservation mode {mode!r}; choose 'empty', 'strip' or 'class'.")
    if mode == "class" and not class_word.strip():
        raise ValueError("preservation mode 'class' needs a class word (e.g. 'dog'); set class_word or use mode 'strip'.")
    out = caption
    for t in triggers:
        if mode == "strip":
            out = trigger_pattern(t).sub("", out)
        else:
            cw = re.escape(class_word.strip())
            out = re.sub(rf"{trigger_pattern(t).pattern}(\s+{cw}(?![^{_EDGE}]))", r"\1", out)
            out = trigger_pattern(t).sub(class_word.strip(), out)
    return _tidy(out)
