"""Plug-ins that act on the trained weights rather than the loss, each switched on by a `TrainConfig` field.

The registry is the only place that names them (as regularizers.py for the loss's): the loop builds what is on from
here and knows each only as a `plugins.StepTerm`. A new one is its module, its TrainConfig fields and one line below.
"""
from __future__ import annotations

from typing import Any

from .ema import WeightEma
from ..step.plugs import Adapter, StepTerm

# TrainConfig field that switches it on (0 / False: off) -> (plug-in, its constructor's arguments from the config)
REGISTRY: dict[str, tuple[type[StepTerm], Any]] = {
    "ema_decay": (WeightEma, lambda cfg: dict(decay=cfg.ema_decay, start_step=cfg.ema_start_step)),
}


def weight_terms(cfg: Any, adapter: Adapter) -> list[StepTerm]:
    """The plug-ins `cfg` switches on, over the installed adapter's parameters."""
    return [cls(adapter, **args(cfg)) for field, (cls, args) in REGISTRY.items() if getattr(cfg, field)]


def metadata(cfg: Any) -> dict[str, str]:
    """Every registered plug-in's settings for a LoRA file's header, on or off."""
    return {k: v for cls, _ in REGISTRY.values() for k, v in cls.metadata(cfg).items()}
