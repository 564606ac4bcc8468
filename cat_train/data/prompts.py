"""Captions: find a trigger as a whole word, insert it, and derive the preservation prompt y from y_T."""
from __future__ import annotations

import re
from typing import Literal, Mapping, Sequence

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


def parse_class_words(text: str | Mapping[str, str]) -> str | dict[str, str]:
    """'dog' (one class word for every trigger) or 'sks=dog, zwx=cat' / one 'trigger=word' per line."""
    if not isinstance(text, str):
        return dict(text)
    if "=" not in text:
        return text.strip()
    out = {}
    for n, line in enumerate(re.split(r"[\n,]", text), 1):
        if not line.strip():
            continue
        tok, sep, word = (x.strip() for x in line.partition("="))
        if not sep or not tok or not word:
            raise ValueError(f"class words entry {n} ({line.strip()!r}) must look like 'sks=dog' "
                             "(or give one word, e.g. 'dog', for every trigger).")
        out[tok] = word
    return out


def class_word_for(trigger: str, class_word: str | Mapping[str, str]) -> str:
    word = class_word.get(trigger, "") if isinstance(class_word, Mapping) else class_word
    if not word.strip():
        if isinstance(class_word, Mapping):
            raise ValueError(f"trigger {trigger!r} has no class word in {dict(class_word)}; add '{trigger}=<word>'.")
        raise ValueError("preservation mode 'class' needs a class word (e.g. 'dog'); set class_word or use mode "
                         "'strip'.")
    if word.strip() == trigger:  # y would equal y_T: the CAT term would compare a prompt with itself
        raise ValueError(f"the class word of trigger {trigger!r} is the trigger itself, so the preservation prompt "
                         "would equal the training caption; pick a trigger the model does not know (e.g. 'sks') and "
                         f"the class as the class word (e.g. '{trigger}').")
    return word.strip()


def preservation_prompt(caption: str, triggers: Sequence[str], mode: PreservationMode,
                        class_word: str | Mapping[str, str] = "") -> str:
    """y for the CAT term: '' (empty), y_T without its triggers (strip), or each trigger -> its class word (class).

    `class_word` is one word for every trigger or a {trigger: word} map (multi-concept: 'sks=dog, zwx=cat').
    In class mode a trigger already followed by its class word ("sks dog") is dropped, not doubled.
    """
    if mode == "empty":
        return ""
    if mode not in ("strip", "class"):
        raise ValueError(f"unknown preservation mode {mode!r}; choose 'empty', 'strip' or 'class'.")
    class_word = parse_class_words(class_word)
    if mode == "class" and isinstance(class_word, str) and not class_word:
        raise ValueError("preservation mode 'class' needs a class word (e.g. 'dog'); set class_word or use mode "
                         "'strip'.")
    out = caption
    for t in triggers:
        if mode == "strip":
            out = trigger_pattern(t).sub("", out)
        else:
            word = class_word_for(t, class_word)
            cw = re.escape(word)
            out = re.sub(rf"{trigger_pattern(t).pattern}(\s+{cw}(?![^{_EDGE}]))", r"\1", out)
            out = trigger_pattern(t).sub(word, out)
    return _tidy(out)


def check_trigger_not_class_word(triggers: Sequence[str], class_word: str, field: str = "class_word") -> None:
    """A dataset whose trigger is its class word: captions 'a toy' would train the class itself."""
    same = [t for t in triggers if t.strip() and t.strip().lower() == class_word.strip().lower()]
    if same:
        raise ValueError(f"trigger {same[0]!r} is the same word as {field} {class_word.strip()!r}: the prompt without "
                         "the trigger (y) would equal the training caption (y_T), so CAT could not tell the subject "
                         "from its class. Use a token the model does not know as the trigger (e.g. 'sks') and keep "
                         f"{class_word.strip()!r} as the class word.")
