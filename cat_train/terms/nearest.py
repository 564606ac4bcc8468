"""Auto preservation's probes from the class word alone (`source = nearest`): the model's own neighbours.

A user names a class word, not its neighbours. The candidates are the words of a vocabulary shipped with the pack
(cat_train/terms/vocabulary/probe_words.txt: nouns of things an image can show and class names from public lists, see
its README) and the dataset's other class words; the `neighbours` ones the model's own text encoder puts closest to the
class word become the probes. Closeness is measured on the conditioning the UNet sees, in the caption's context:

    template   the image's preservation prompt y with its class word cut out ("a on a grey background")
    v(w)       encode(y with the class word replaced by w) - encode(template), the whole (tokens x channels) tensor
    sim(w)     cosine(v(w), v(class word))

i.e. the change a word makes to its caption's conditioning, compared with the change the class word makes. Taking
the whole tensor, positions included, keeps what cross-attention reads (a mean over tokens let shared padding and
template tokens decide on the world model: `star` ranked 60th of 187 distinct conditionings instead of 7th).
Subtracting the template removes what every candidate shares. Words whose conditioning equals another candidate's are
left out: the encoder has no token of its own for them (the world's tokenizer hashes unknown words onto 16 spare ids;
CLIP's BPE never does this), so they are no class it knows. Words holding the class word or a trigger as a word
("vicious circle") are left out too: they are near by spelling, not by meaning. Of the k nearest, those below FLOOR
times the nearest one's cosine are left out: a neighbour is near, not merely among the nearest k.

The ranking encodes every candidate once per run (5,800 prompts with the shipped list; batched, no-grad, each
compared and dropped at once so memory holds one batch); `NearestProbes.seconds` is its cost.
"""
from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

VOCABULARY = Path(__file__).resolve().parent / "vocabulary" / "probe_words.txt"
BATCH = 64  # candidate prompts per encode call
# A candidate whose cosine is below FLOOR x the nearest one's is no neighbour, even among the k nearest. On the world
# the four other shapes are at 0.77-0.89 and the next candidate at 0.49 (docs/auto-preservation.md).
FLOOR = 0.75


@functools.lru_cache(maxsize=4)
def vocabulary(path: str | Path = VOCABULARY) -> tuple[str, ...]:
    """The shipped candidate words ('#' lines are the header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall the pack, or rebuild it with "
                                "`python -m cat_train.terms.vocabulary.build`.")
    lines = (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return tuple(w for w in lines if w and not w.startswith("#"))


@dataclass(frozen=True)
class NearestProbes:
    """One class word's ranking: the chosen probes with their similarity, and what choosing them cost."""
    class_word: str
    probes: tuple[tuple[str, float], ...]  # (word, cosine), nearest first
    candidates: int  # ranked (after the words left out)
    left_out: int    # same conditioning as another word, or holding the class word / a trigger
    seconds: float

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(w for w, _ in self.probes)

    def report(self) -> dict:
        return {"class_word": self.class_word, "probes": [[w, round(s, 4)] for w, s in self.probes],
                "candidates": self.candidates, "left_out": self.left_out, "seconds": round(self.seconds, 3)}


def _word_re(word: str) -> str:
    return rf"(?<!\w){re.escape(word)}(?!\w)"


def _fit(x: Tensor, length: int) -> Tensor:
    """(B, L, C) cut or zero-padded to `length` tokens: a candidate that spills into another 77-token chunk is
    compared on the class prompt's tokens."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])], 1)


def _as_tokens(x: Tensor) -> Tensor:
    return x[:, None] if x.ndim == 2 else x  # a pooled (B, C) encoder: one "token"


@torch.no_grad()
def rank(class_word: str, y: str, candidates: Iterable[str], encode: Callable[[list[str]], Tensor], k: int,
         exclude: Sequence[str] = (), floor: float = FLOOR) -> NearestProbes:
    """The k candidates nearest to class_word in caption y, as the module docstring defines it.

    encode(prompts) -> (B, L, C) conditioning (or (B, C) pooled). exclude: words that may not appear in a candidate
    (triggers). floor: of the k nearest, those below floor x the nearest one's cosine are left out. Ties keep the
    candidates' order."""
    t0 = time.perf_counter()
    found = re.search(_word_re(class_word), y)
    prompt = (lambda w: re.sub(_word_re(class_word), w, y)) if found else (lambda w: w)
    template = " ".join(re.sub(_word_re(class_word), "", y).split()) if found else ""
    banned = [_word_re(w.lower()) for w in (class_word, *exclude) if w]
    words, left_out = [], 0
    for w in dict.fromkeys(c.strip() for c in candidates):
        if w and not any(re.search(b, w.lower()) for b in banned):
            words.append(w)
        elif w:
            left_out += 1
    ref = _as_tokens(encode([template]).float())
    length = ref.shape[1]
    ref = ref[0].flatten()
    target = _as_tokens(encode([prompt(class_word)]).float())[0].flatten() - ref
    sims, seen = [], {}
    for i in range(0, len(words), BATCH):
        v = _fit(_as_tokens(encode([prompt(w) for w in words[i:i + BATCH]]).float()), length).flatten(1)
        for row in v:
            key = hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=16).digest()
            seen[key] = seen.get(key, 0) + 1
            sims.append((key, torch.nn.functional.cosine_similarity(row - ref, target, dim=0).item()))
    kept = [(w, s) for w, (key, s) in zip(words, sims) if seen[key] == 1]
    left_out += len(words) - len(kept)
    order = sorted(range(len(kept)), key=lambda j: (-kept[j][1], j))[:k]
    if order and kept[order[0]][1] > 0:  # far below the nearest is no neighbour, however many k allows
        order = [j for j in order if kept[j][1] >= floor * kept[order[0]][1]]
    return NearestProbes(class_word, tuple(kept[j] for j in order), len(kept), left_out, time.perf_counter() - t0)


def context_encoder(encode_text: Callable[[list[str]], dict]) -> Callable[[list[str]], Tensor]:
    """The core's encode_text (prompts -> {"context", ...}) as a ranking encoder: the context the UNet reads."""
    return lambda prompts: encode_text(prompts)["context"]


def class_words(own_words: Sequence[str], class_word: str | Mapping[str, str]) -> list[str]:
    """The class words an image's probes replace: its own (its triggers' words); without, the configured word."""
    own = [w for w in own_words if w]
    if own:
        return list(dict.fromkeys(own))
    if isinstance(class_word, str) and class_word.strip():
        return [class_word.strip()]
    raise ValueError("auto preservation source `nearest` ranks words by their closeness to the class word, but CAT "
                     "Loss Config's class_word is empty: set it (e.g. 'dog', or 'sks=dog, zwx=cat'), or use source "
                     "`common` or `list`.")


def choose(images: Sequence[tuple[str, tuple[str, ...], Sequence[str]]], class_word: str | Mapping[str, str],
           encode: Callable[[list[str]], Tensor], k: int,
           candidates: Iterable[str] | None = None) -> dict[str, NearestProbes]:
    """{class word: its NearestProbes}; images: each image's (y, triggers, class words of its triggers).

    One ranking per class word, in the y of its first image (the probe prompt's own context). Candidates: the shipped
    vocabulary (or `candidates`) and the dataset's other class words."""
    others = tuple(dict.fromkeys(class_word.values())) if isinstance(class_word, Mapping) else ()
    words = tuple(vocabulary() if candidates is None else candidates)
    triggers = tuple(dict.fromkeys(t for _, trig, _ in images for t in trig))
    out: dict[str, NearestProbes] = {}
    for y, _, own in images:
        for word in class_words(own, class_word):
            if word not in out:
                pool = (*(o for o in others if o != word), *words)
                out[word] = rank(word, y, pool, encode, k, exclude=triggers)
    return out
