"""Auto preservation's settings and probe prompts, and the term they build (cat_train/terms/auto.py).

The composition root (training/config.py) carries an `AutoPreservationConfig` on `CatLossConfig`; before step 1
`training.build_examples` asks the terms registry for each image's probe prompts (`extra_prompts`), so they are
encoded once with the rest.

A probe is a class word (or short phrase: "teddy bear"). Its prompt for an image is the image's preservation
prompt y with the image's class word replaced by the probe, so it keeps the caption's context: training
"a photo of sks dog on a beach" (y "a photo of dog on a beach"), the probe `cat` is measured and, once added,
preserved as "a photo of cat on a beach". Where y holds no class word (modes `strip` and `empty`, or the word
is not in the caption), the probe is the prompt itself.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Mapping, Sequence

from . import nearest
from .auto import AutoPreservation
from .auto_checks import RULES, Rule

ProbeSource = Literal["list", "dataset", "common", "nearest"]
SOURCES = ("list", "dataset", "common", "nearest")

# Common subjects of photos, for `source = common`: people, animals, objects and scenes, styles. A class
# word's neighbours are unknown to the trainer; these are what personalisation datasets usually sit beside.
COMMON_SUBJECTS = (
    "person", "man", "woman", "child", "baby", "face",
    "dog", "cat", "horse", "bird", "cow", "bear", "rabbit", "fish",
    "car", "bicycle", "house", "chair", "table", "cup", "bottle", "shoe", "bag", "toy", "teddy bear", "flower",
    "tree", "building", "mountain", "city street",
    "painting", "drawing", "cartoon", "sculpture",
)


@dataclass
class AutoPreservationConfig:
    every: int = field(default=0, metadata={"help": (
        "measure every probe's keep drift every N optimizer steps and preserve the worst (0 = off). Each "
        "measurement costs probes x images x points no-grad forwards (frozen ones once per run), no sampling.")})
    source: ProbeSource = field(default="list", metadata={"help": (
        "where the probes come from: `list` (the `probes` given), `dataset` (the other class words of a "
        "multi-concept dataset: each image is probed with every class word but its own), `common` (a shipped "
        "list of 34 common photo subjects: people, animals, objects, scenes, styles; docs/auto-preservation.md), "
        "`nearest` (the `neighbours` words of a shipped vocabulary of 5,800 things an image can show and the dataset's "
        "other class words that the model's own text encoder puts closest to the class word: "
        "cat_train/terms/nearest.py).")})
    probes: tuple[str, ...] = field(default=(), metadata={"help": (
        "for `list`: the probe class words (short phrases); each replaces the image's class word in its "
        "preservation prompt. In the node one per line.")})
    neighbours: int = field(default=8, metadata={"since": "0.2.0", "min": 1, "max": 100, "help": (
        "for `nearest`: how many of the candidates closest to the class word become probes at most (fewer where the "
        "rest are below 0.75 x the nearest one's cosine; each costs images x points no-grad forwards per measurement). "
        "The ranking encodes the whole vocabulary once per run.")})
    top_k: int = field(default=2, metadata={"help": (
        "budget: at most this many probes are added over the whole run (the worst first).")})
    threshold: float = field(default=0.01, metadata={"help": (
        "a probe is added only when its score is above this. Its score (`rule`): `absolute`, its keep drift (mean "
        "squared difference, frozen vs adapted prediction, in the model's own units: eps, v or flow velocity); "
        "`relative`, that drift divided by the drift of the image's own preservation prompt at the same points (no "
        "units: 1 = the neighbour moved as much as the class prompt CAT keeps).")})
    rule: Rule = field(default="absolute", metadata={"since": "0.2.0", "help": (
        "what `threshold` is compared with: `absolute` (the drift in the model's units) or `relative` (the drift over "
        "the kept class prompt's: the same on any model and at any step; cat_train/terms/auto_checks.py).")})
    first: int = field(default=0, metadata={"since": "0.2.0", "min": 0, "max": 100000, "help": (
        "step of the first measurement, then at each doubling of it below `every` (5 with every 50: steps 5, 10, 20, "
        "40, 50, 100, ...), so a neighbour that moves in the first steps is caught early; 0 = first at `every`.")})
    points: int = field(default=4, metadata={"help": (
        "fixed (noise, timestep) points per training image at which a probe's drift is measured.")})
    images: int = field(default=4, metadata={"help": (
        "training images measured, spread evenly over the dataset (0 = all): the measurement's cost grows with it.")})
    seed: int = field(default=0, metadata={"help": (
        "seed of the measurement points (their own generator: the training draws are not touched).")})

    def __post_init__(self):
        self.probes = tuple(p.strip() for p in self.probes if p.strip())
        checks = [
            (self.every >= 0, f"auto preservation `every` must be >= 0 (0 = off), got {self.every}."),
            (self.source in SOURCES, f"auto preservation `source` must be one of {', '.join(SOURCES)}, got "
                                     f"{self.source!r}."),
            (self.top_k >= 1, f"auto preservation `top_k` must be >= 1, got {self.top_k}."),
            (self.threshold >= 0, f"auto preservation `threshold` must be >= 0, got {self.threshold}."),
            (self.points >= 1, f"auto preservation `points` must be >= 1, got {self.points}."),
            (self.rule in RULES, f"auto preservation `rule` must be one of {', '.join(RULES)}, got {self.rule!r}."),
            (self.first >= 0, f"auto preservation `first` must be >= 0 (0 = at `every`), got {self.first}."),
            (self.neighbours >= 1, f"auto preservation `neighbours` must be >= 1, got {self.neighbours}."),
            (self.images >= 0, f"auto preservation `images` must be >= 0 (0 = all), got {self.images}."),
            (not (self.every and self.source == "list" and not self.probes),
             "auto preservation with source `list` needs probes (class words, one per line, e.g. 'cat'), "
             "or choose source `common` or `dataset`."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def active(self) -> bool:
        return self.every > 0

    def metadata(self, history: Sequence[dict] = ()) -> dict[str, str]:
        """The settings for a LoRA file's header (str values), and the probes the run added (and, for `nearest`, the
        ranking that chose them) as its history tells."""
        added = next((row["auto_added"] for row in reversed(history) if "auto_added" in row), [])
        ranked = next((row["auto_nearest"] for row in reversed(history) if row.get("auto_nearest")), [])
        return {"cat_auto_preservation": json.dumps(asdict(self), sort_keys=True),
                "cat_auto_preservation_active": str(self.active).lower(),
                "cat_auto_preservation_added": json.dumps([{"probe": p, "step": s, "drift": round(d, 6)}
                                                           for p, s, d in added]),
                **({"cat_auto_preservation_nearest": json.dumps(ranked)} if ranked else {})}

    def build(self, denoiser, adapter=None) -> AutoPreservation:
        return AutoPreservation(denoiser, self)

    def rank(self, images: Callable[[], Sequence[tuple[str, tuple[str, ...], Sequence[str]]]],
             class_word: str | Mapping[str, str], encode) -> dict[str, nearest.NearestProbes]:
        """Source `nearest`: {class word: its ranking}, once per run before step 1 (terms/nearest.py); {} otherwise.
        images(): each image's (y, triggers, class words of its triggers); encode: prompts -> (B, L, C)."""
        if not (self.active and self.source == "nearest"):
            return {}
        return nearest.choose(images(), class_word, encode, self.neighbours)

    def extra_prompts(self, y: str, own_words: Sequence[str], class_word: str | Mapping[str, str],
                      ranked: Mapping[str, nearest.NearestProbes] | None = None) -> dict[str, str]:
        """{probe: prompt} for one image whose preservation prompt is y and whose class words are own_words; ranked:
        `rank`'s, for `nearest` (the probes of the image's class words)."""
        if self.source == "nearest":
            ranked = ranked or {}
            # own_words is empty where y holds no class word (`strip`, `empty`): the configured word's ranking, or
            # with several class words every ranking's probes
            keys = ([w for w in own_words if w]
                    or ([class_word.strip()] if isinstance(class_word, str) else list(ranked)))
            words = tuple(w for cw in keys if cw in ranked for w in ranked[cw].words)
            return image_probes(y, own_words, tuple(dict.fromkeys(words)))
        return image_probes(y, own_words, probe_words(self, class_word))


def probe_words(cfg: AutoPreservationConfig, class_word: str | Mapping[str, str]) -> tuple[str, ...]:
    """Every probe of the run (an image is not probed with its own class word: `image_probes`)."""
    if cfg.source == "list":
        return cfg.probes
    if cfg.source == "common":
        return COMMON_SUBJECTS
    if cfg.source == "nearest":
        raise ValueError("auto preservation source `nearest` ranks words with the text encoder: its probes come from "
                         "AutoPreservationConfig.rank (training.build_examples calls it), not from probe_words.")
    words = tuple(dict.fromkeys(class_word.values())) if isinstance(class_word, Mapping) else ()
    if len(words) < 2:
        raise ValueError("auto preservation source `dataset` needs a multi-concept dataset with two or more class "
                         "words in CAT Loss Config's class_word ('sks=dog, zwx=cat'); give probes as a `list` or use "
                         "`common`.")
    return words


def image_probes(y: str, own_words: Sequence[str], probes: Sequence[str]) -> dict[str, str]:
    """{probe: prompt} for one image whose preservation prompt is y and whose class words are own_words."""
    own = [w for w in own_words if w]
    found = [w for w in own if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", y)]
    out = {}
    for p in probes:
        if p in own:
            continue
        prompt = y
        for w in found:
            prompt = re.sub(rf"(?<!\w){re.escape(w)}(?!\w)", p, prompt)
        out[p] = prompt if found else p
    return out
