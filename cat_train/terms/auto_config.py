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
from typing import Literal, Mapping, Sequence

from .auto import AutoPreservation

ProbeSource = Literal["list", "dataset", "common"]
SOURCES = ("list", "dataset", "common")

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
        "list of 34 common photo subjects: people, animals, objects, scenes, styles; docs/auto-preservation.md).")})
    probes: tuple[str, ...] = field(default=(), metadata={"help": (
        "for `list`: the probe class words (short phrases); each replaces the image's class word in its "
        "preservation prompt. In the node one per line.")})
    top_k: int = field(default=2, metadata={"help": (
        "budget: at most this many probes are added over the whole run (the worst first).")})
    threshold: float = field(default=0.01, metadata={"help": (
        "a probe is added only when its keep drift (mean squared difference, frozen vs adapted prediction, in the "
        "model's own units: eps, v or flow velocity) is above this.")})
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
        """The settings for a LoRA file's header (str values), and the probes the run added as its history tells."""
        added = next((row["auto_added"] for row in reversed(history) if "auto_added" in row), [])
        return {"cat_auto_preservation": json.dumps(asdict(self), sort_keys=True),
                "cat_auto_preservation_active": str(self.active).lower(),
                "cat_auto_preservation_added": json.dumps([{"probe": p, "step": s, "drift": round(d, 6)}
                                                           for p, s, d in added])}

    def build(self, denoiser, adapter=None) -> AutoPreservation:
        return AutoPreservation(denoiser, self)

    def extra_prompts(self, y: str, own_words: Sequence[str], class_word: str | Mapping[str, str]) -> dict[str, str]:
        """{probe: prompt} for one image whose preservation prompt is y and whose class words are own_words."""
        return image_probes(y, own_words, probe_words(self, class_word))


def probe_words(cfg: AutoPreservationConfig, class_word: str | Mapping[str, str]) -> tuple[str, ...]:
    """Every probe of the run (an image is not probed with its own class word: `image_probes`)."""
    if cfg.source == "list":
        return cfg.probes
    if cfg.source == "common":
        return COMMON_SUBJECTS
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
