"""The one registry of step terms: each entry the config class of one term, and where a run's configuration holds it.

A config class has `active` (does it switch its term on), `metadata(history)` (its settings for a LoRA file's
header, written whether it is on or off, with what the run decided as its history rows tell) and
`build(denoiser, adapter)` (its term, attached to the adapted model). The loop builds what is on from here, asks
here for the prompts a term needs per image before step 1 (`extra_prompts`, after what a term ranks with the text
encoder: `rank`), and knows each term only by its roles (`step.plugs`). A new term is its module, its config class,
a field (or property) on CatLossConfig or TrainConfig (training/config.py) and one line below.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..step.plugs import Term
from .apt_config import AptConfig
from .auto_config import AutoPreservationConfig
from .ema import EmaSettings
from .keep_local import LocalKeepSettings
from .mask import MaskSettings
from .min_snr import MinSnr

# config class -> where its settings are: "loss" (CatLossConfig) or "train" (TrainConfig), and the attribute there.
# In this order terms are built and called (a penalty's place in the loss sum is part of a run's bits).
REGISTRY: dict[type, tuple[str, str]] = {
    AptConfig: ("loss", "apt"),
    AutoPreservationConfig: ("loss", "auto"),
    MinSnr: ("loss", "min_snr"),
    MaskSettings: ("loss", "mask"),
    LocalKeepSettings: ("loss", "local_keep"),
    EmaSettings: ("train", "ema"),
}


def settings(loss_cfg: Any, cfg: Any = None) -> list:
    """Every registered term's settings in this run's configuration (the TrainConfig's left out where cfg is None)."""
    out = []
    for cls, (where, attr) in REGISTRY.items():
        if where == "train" and cfg is None:
            continue
        found = getattr(loss_cfg if where == "loss" else cfg, attr)
        if not isinstance(found, cls):
            raise TypeError(f"{where} config's {attr} is a {type(found).__name__}, the registry expects a "
                            f"{cls.__name__}.")
        out.append(found)
    return out


def build(loss_cfg: Any, cfg: Any, denoiser: Any, adapter: Any) -> list[Term]:
    """The terms this configuration switches on, attached to the (already adapted) model."""
    return [s.build(denoiser, adapter) for s in settings(loss_cfg, cfg) if s.active]


def metadata(loss_cfg: Any, cfg: Any, history: Sequence[dict] = ()) -> dict[str, str]:
    """Every registered term's settings for a LoRA file's header, on or off (files say what was not used too), and
    what each decided during the run as its history rows tell (auto preservation: the probes it added)."""
    return {k: v for s in settings(loss_cfg, cfg) for k, v in s.metadata(history).items()}


def rank(loss_cfg: Any, images: Callable[[], Sequence[tuple[str, tuple[str, ...], Sequence[str]]]],
         encode: Callable[[list[str]], Any]) -> dict[str, Any]:
    """What the active terms rank with the text encoder before step 1, once per run (auto preservation `nearest`:
    {class word: its ranking}). images() gives each image's (y, triggers, class words), asked only by such a term;
    encode(prompts) -> (B, L, C)."""
    out: dict[str, Any] = {}
    for s in settings(loss_cfg):
        if s.active and hasattr(s, "rank"):
            out.update(s.rank(images, loss_cfg.class_word, encode))
    return out


def extra_prompts(loss_cfg: Any, y: str, own_words: Callable[[], Sequence[str]],
                  ranked: Mapping[str, Any] | None = None) -> dict[str, str]:
    """{name: prompt} the active terms need encoded for one image whose preservation prompt is y and whose class
    words own_words() gives (auto preservation's probes); ranked: `rank`'s."""
    out: dict[str, str] = {}
    for s in settings(loss_cfg):
        if s.active and hasattr(s, "extra_prompts"):
            out.update(s.extra_prompts(y, own_words(), loss_cfg.class_word, ranked))
    return out
