"""Caption dropout and tag shuffling (kohya's caption_dropout_rate, shuffle_caption and keep_tokens) on cached
conditionings.

Captions are encoded once, before step 1 (`train.build_examples`): a real CLIP in the loop would cost a text-encoder
pass per sample per step, and kohya turns its text-encoder cache off for shuffling for that reason. Here each caption
gets `caption_variants` shuffles, drawn before training from a generator seeded with the run's seed, each encoded once
with the y made from it (y = preservation_prompt(shuffled y_T)), so y_T and y stay a matched pair; a dropped caption is
one more row, y_T = y = "" with keep weight 0 (there is no concept in "" to keep apart from). The extra cost is
2 x caption_variants text-encoder calls per image once (fewer where prompts repeat), and 2 x (caption_variants + 1)
shared conditionings per image in memory; none per step.

Those rows are `Example`s with `drawn=False`: the sampler never draws them itself. It draws images as always, then, for
an image whose example has a `CaptionChoice`, which of its rows the step uses, from the run's generator: one rand for
dropout (when on), one randint among the variants (when shuffling). With both options off no example has a choice and
nothing more is drawn, so runs stay bit-identical and resumes exact (the generator's state is in every checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

TAG_SEPARATOR = ","


def tags(caption: str) -> list[str]:
    """The caption's comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(TAG_SEPARATOR) if t.strip()]


def shuffled(caption: str, keep: int, gen: torch.Generator) -> str:
    """The caption with its tags after the first `keep` in a random order (one randperm from gen), joined by ', '."""
    parts = tags(caption)
    head, tail = parts[:keep], parts[keep:]
    order = torch.randperm(len(tail), generator=gen).tolist() if len(tail) > 1 else list(range(len(tail)))
    return ", ".join(head + [tail[i] for i in order])


def variants(caption: str, cfg: Any, gen: torch.Generator) -> list[str]:
    """The captions an image trains on: `caption_variants` shuffles, or the caption itself when not shuffling."""
    if not cfg.shuffle_tags:
        return [caption]
    return [shuffled(caption, cfg.keep_tags, gen) for _ in range(cfg.caption_variants)]


def active(cfg: Any) -> bool:
    return cfg is not None and (cfg.caption_dropout > 0 or cfg.shuffle_tags)


@dataclass(frozen=True)
class CaptionChoice:
    """Which example row a draw of an image uses: `dropped` with probability `dropout`, else one of `rows` uniformly."""
    dropout: float
    dropped: int | None
    rows: tuple[int, ...]

    def pick(self, gen: torch.Generator) -> int:
        if self.dropout > 0 and float(torch.rand((), generator=gen, dtype=torch.float64)) < self.dropout:
            return self.dropped  # type: ignore[return-value]
        if len(self.rows) > 1:
            return self.rows[int(torch.randint(len(self.rows), (1,), generator=gen))]
        return self.rows[0]


def pick_rows(examples: Sequence[Any], idx: list[int], gen: torch.Generator) -> list[int]:
    """Each drawn example's caption row (itself when it has no choice: no draw)."""
    return [examples[i].captions.pick(gen) if examples[i].captions is not None else i for i in idx]


def check_examples(examples: Sequence[Any], cfg: Any) -> None:
    """Caption options that the examples were not built with would silently train without them."""
    if active(cfg) and not any(getattr(ex, "captions", None) is not None for ex in examples):
        raise ValueError("caption_dropout / shuffle_tags are set but the training examples carry no caption rows: "
                         "build them with train.build_examples(..., cfg=the TrainConfig), or set both options off.")


def metadata(cfg: Any) -> dict[str, str]:
    """The caption options for a LoRA header, under kohya's names where it has them (written on or off)."""
    return {"ss_caption_dropout_rate": str(float(cfg.caption_dropout)),
            "ss_shuffle_caption": str(bool(cfg.shuffle_tags)),
            "ss_keep_tokens": str(int(cfg.keep_tags)), "cat_caption_variants": str(int(cfg.caption_variants))}
