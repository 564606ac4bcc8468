"""The regularizers a CAT run can plug in, each under the `CatLossConfig` field that configures it.

The registry is the only place that names them (the shape of ComfyUI's comfy/weight_adapter registry): the loop
builds what is switched on from here and knows each only as a `plugins.StepTerm`. A new regularizer is its
module, its config field on `CatLossConfig` and one line below.
"""
from __future__ import annotations

from typing import Sequence

from .apt import AptRun
from .auto import AutoPreservation
from .denoiser import Denoiser
from .loss import CatLossConfig
from .keep_local import LocalKeep
from .mask import MaskedLoss
from .plugins import StepTerm
from .timestep_weighting import MinSnrWeight

# CatLossConfig field (or property: `mask` gathers mask_floor and mask_keep, `local_keep` keep_estimator and
# keep_local_weights) -> plug-in (its `name` is the field's, or says what the property gathers)
REGISTRY: dict[str, type[StepTerm]] = {"apt": AptRun, "auto": AutoPreservation, "min_snr_gamma": MinSnrWeight,
                                       "mask": MaskedLoss, "local_keep": LocalKeep}


def step_terms(loss_cfg: CatLossConfig, denoiser: Denoiser) -> list[StepTerm]:
    """The plug-ins this config switches on, attached to the (already adapted) model; close() each when done."""
    return [cls(denoiser, getattr(loss_cfg, field)) for field, cls in REGISTRY.items() if cls.switched_on(getattr(loss_cfg, field))]


def metadata(loss_cfg: CatLossConfig, history: Sequence[dict] = ()) -> dict[str, str]:
    """Every registered regularizer's settings for a LoRA file's header, on or off (files say what was not used too),
    and what each decided during the run as its history rows tell (auto preservation: the probes it added)."""
    return {k: v for field, cls in REGISTRY.items() for k, v in cls.metadata(getattr(loss_cfg, field), history).items()}
