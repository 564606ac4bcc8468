"""What the loop trains on: `Example`s, each one training image with its cached latent and conditionings.

`build_examples` encodes every distinct prompt once before step 1: the captions y_T, the preservation prompts y,
the caption rows of caption dropout and tag shuffling (data/captions.py) and the prompts a term asks for per image
(`terms.registry.extra_prompts`: auto preservation's probes). Examples share their conditionings.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..data import captions as caption_rows
from ..data.captions import CaptionChoice
from ..data.prompts import class_word_for, preservation_prompt
from ..step.denoiser import Cond
from ..terms import registry
from .config import CatLossConfig, TrainConfig

log = logging.getLogger("cat_train")


@dataclass
class Example:
    """One training image: its cached latent and the cached conditionings of y_T and y."""
    latent: Tensor          # (C, H, W)
    cond_token: Cond        # unbatched: {"context": (L, C), ...}
    cond_pres: Cond
    weight: float = 1.0     # weight of its preservation term (per-token weights)
    repeats: int = 1        # sampling weight (kohya repeats)
    prompts: tuple[str, str] | None = None  # (y_T, y) for adapters that encode prompts every step (no cached conds)
    # auto preservation: {probe: its prompt's cond} for this image
    probes: dict[str, Cond] = field(default_factory=dict)
    # positions of the trigger's tokens in y_T's context, for step terms that skip them
    trigger_tokens: tuple[int, ...] = ()
    captions: CaptionChoice | None = None  # caption dropout / tag shuffling: which row a draw of this image uses
    drawn: bool = True  # False: a caption row (shuffled or dropped caption), reached only through an image's `captions`
    # (1, H, W) at the latent's size in [0, 1], 1 = subject: masked training (cat_train/terms/mask.py)
    mask: Tensor | None = None
    # what the terms ranked with the text encoder before step 1 (auto preservation `nearest`: one ranking per class
    # word), for their report; every example holds the same tuple
    rankings: tuple = ()



PAIRS_WARN = 5000  # image x preservation-prompt pairs past which the preparation time is worth a line


def build_examples(items: Sequence[tuple], encode_text: Callable[[list[str]], Cond], loss_cfg: CatLossConfig,
                   progress: Callable[[int, int], None] | None = None,
                   token_positions: Callable[[str, tuple[str, ...]], tuple[int, ...]] | None = None,
                   cfg: TrainConfig | None = None,
                   rank_text: Callable[[list[str]], Tensor] | None = None) -> list[Example]:
    """items: (latent, caption, triggers[, repeats[, mask]]), mask (1, H, W) at the latent's size or None. Each distinct
    prompt is encoded once; progress(done, total) after each (a host moves its bar and stops at Cancel there).
    Examples share their conditionings.
    token_positions(caption, triggers): where the host's tokenizer puts the trigger's tokens in the caption's context
    (Example.trigger_tokens). cfg: its caption_dropout / shuffle_tags add each image's caption rows after the
    images' own examples (cat_train/data/captions.py). rank_text(prompts) -> (B, L, C): the conditioning a term ranks
    words with (`terms.registry.rank`; the context of encode_text where None)."""
    rows = [(it[0], it[1], tuple(it[2]), it[3] if len(it) > 3 else 1) for it in items]
    masks = [it[4] if len(it) > 4 else None for it in items]
    if loss_cfg.preservation_prompts:  # every image with every listed y: the CAT term keeps each of them
        pres = [list(loss_cfg.preservation_prompts) for _ in rows]
        pairs = len(rows) * len(loss_cfg.preservation_prompts)
        if pairs > PAIRS_WARN:
            log.warning("%d images x %d preservation prompts = %d training examples (each prompt encoded once, the "
                        "examples share them); a few dozen prompts are usually enough.", len(rows),
                        len(loss_cfg.preservation_prompts), pairs)
    else:
        pres = [[preservation_prompt(cap, trig, loss_cfg.preservation,
                                     loss_cfg.class_word)] for _, cap, trig, _ in rows]
    # one ranking per run, from every image's y and class words (auto preservation `nearest`; {} for other terms)
    ranked = registry.rank(loss_cfg, lambda: [(ps[0], trig, _class_words(loss_cfg, trig))
                                              for (_, _, trig, _), ps in zip(rows, pres)],
                           rank_text or (lambda prompts: encode_text(prompts)["context"]))
    probes = [_extra_prompts(loss_cfg, trig, ps[0], ranked) for (_, _, trig, _), ps in zip(rows, pres)]
    rankings = tuple(ranked.values())
    with_rows = caption_rows.active(cfg)
    # not the run's: it exists only in train()
    shuffle_gen = torch.Generator().manual_seed(cfg.seed) if with_rows else None
    # per image, per example of it: [(y_T, y)] of each caption variant
    pairs = [[[(v, p if loss_cfg.preservation_prompts else preservation_prompt(v, trig, loss_cfg.preservation,
                                                                                 loss_cfg.class_word))
               for v in vs] for p in ps]
             for (_, cap, trig, _), ps, vs in zip(rows, pres,
                                                  [caption_rows.variants(r[1], cfg, shuffle_gen) for r in rows])
             ] if with_rows else []
    extra = ({p for per_image in pairs for per_ex in per_image for pair in per_ex for p in pair}
             | ({""} if with_rows else set()))
    prompts = sorted({cap for _, cap, _, _ in rows} | {p for ps in pres for p in ps}
                     | {p for pr in probes for p in pr.values()} | extra)
    # one prompt per call: a batch would pad every prompt to the longest, changing short captions' conditioning
    cond = {}
    for i, p in enumerate(prompts):
        cond[p] = {k: v[0].detach().cpu() for k, v in encode_text([p]).items()}
        if progress:
            progress(i + 1, len(prompts))

    def weight(trig: tuple[str, ...]) -> float:
        return sum(loss_cfg.token_weights.get(t, 1.0) for t in trig) / len(trig) if trig else 1.0

    out = []
    for (lat, cap, trig, rep), ps, pr, mask in zip(rows, pres, probes, masks):
        image_probes = {name: cond[p] for name, p in pr.items()}  # one dict per image: its rows share it
        tokens = tuple(token_positions(cap, trig)) if token_positions and trig else ()
        if mask is not None and tuple(mask.shape[-2:]) != tuple(lat.shape[-2:]):
            raise ValueError(f"the mask of {cap!r} is {tuple(mask.shape[-2:])}, its latent {tuple(lat.shape[-2:])}; "
                             "bring masks to the latent's size (cat_train.data.masks.latent_mask).")
        mask = None if mask is None else mask.detach().float().cpu().reshape(1, *lat.shape[-2:])
        out += [Example(lat.detach().cpu(), cond[cap], cond[p], weight(trig), rep, probes=image_probes,
                        trigger_tokens=tokens, mask=mask, rankings=rankings) for p in ps]
    if with_rows:
        out = _with_caption_rows(out, rows, pairs, cond, weight, cfg, token_positions)
    return out


def _with_caption_rows(out: list[Example], rows, pairs, cond, weight, cfg: TrainConfig,
                       token_positions) -> list[Example]:
    """The examples, each given its CaptionChoice, followed by their caption rows (`drawn=False`)."""
    extra: list[Example] = []
    primary = iter(enumerate(out))
    for (_, _, trig, _), per_image in zip(rows, pairs):
        for per_ex in per_image:
            i, ex = next(primary)
            start = len(out) + len(extra)
            extra += [Example(ex.latent, cond[v], cond[y], weight(trig), ex.repeats, probes=ex.probes, drawn=False,
                              trigger_tokens=tuple(token_positions(v, trig)) if token_positions and trig else ())
                      for v, y in per_ex] if cfg.shuffle_tags else []
            variant_rows = tuple(range(start, len(out) + len(extra))) or (i,)  # not shuffling: its own caption
            dropped = None
            if cfg.caption_dropout > 0:  # no concept in "": nothing to keep apart from, keep weight 0
                dropped = len(out) + len(extra)
                extra.append(Example(ex.latent, cond[""], cond[""], 0.0, ex.repeats, probes=ex.probes, drawn=False))
            ex.captions = CaptionChoice(cfg.caption_dropout, dropped, variant_rows)
    return out + extra


def _class_words(loss_cfg: CatLossConfig, triggers: tuple[str, ...]) -> list[str]:
    """An image's class words, whatever the preservation mode (none without a trigger or a class word)."""
    cw = loss_cfg.class_word
    has_word = bool(cw.strip()) if isinstance(cw, str) else bool(cw)
    return list(dict.fromkeys(class_word_for(t, cw) for t in triggers)) if has_word else []


def _extra_prompts(loss_cfg: CatLossConfig, triggers: tuple[str, ...], y: str, ranked: dict) -> dict[str, str]:
    """The prompts the terms ask for one image, {name: prompt} (auto preservation's probes; none while off);
    ranked: what the terms ranked before (`registry.rank`)."""
    def own_words() -> list[str]:  # asked only by an active term: without one no class word is needed
        return ([class_word_for(t,
                                loss_cfg.class_word) for t in triggers] if loss_cfg.preservation == "class" and triggers
                else [])
    return registry.extra_prompts(loss_cfg, y, own_words, ranked)


def batch_note(examples: Sequence[Example], cfg: TrainConfig) -> str | None:
    """Batches come from one bucket; one smaller than batch_size repeats its images inside every batch."""
    sizes: dict[tuple, int] = {}
    for ex in (ex for ex in examples if ex.drawn):
        sizes[tuple(ex.latent.shape)] = sizes.get(tuple(ex.latent.shape), 0) + 1
    largest = max(sizes.values())
    if cfg.batch_size <= largest:
        return None
    note = (f"batch_size {cfg.batch_size} is larger than the "
            f"{'number of examples' if len(sizes) == 1 else 'largest bucket'} ({largest}): every batch repeats images, "
            f"which costs memory and time and trains nothing more; lower batch_size to {largest} or less (raise "
            "grad_accum for a larger effective batch).")
    log.warning(note)
    return note
