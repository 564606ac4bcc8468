"""APT's settings (cat_train/apt.py describes the method), apart from the plug-in itself.

It imports only `families` (the default layers): `loss.CatLossConfig` carries an `AptConfig` without the objective importing the regularizer that
plugs into it (apt.py imports loss.py's protocol, never the reverse).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .families import SDUNet

AUGMENT_OPS = ("flip", "zoom", "rotate", "shift", "color")


@dataclass
class AptConfig:
    adaptive: float = field(default=0.0, metadata={"help": (
        "gain of the per-timestep-bin response to the overfitting indicator o_b: fit weight 1 - gain*o_b, augmentation "
        "probability gain*o_b (0 = off).")})
    stabilize: float = field(default=0.0, metadata={"help": (
        "weight of the representation-stabilization penalty: shift of per-channel feature mean/variance, adapted vs "
        "frozen (0 = off; 5, the APT Options node's default, was calibrated on the world model, not on SD).")})
    align: float = field(default=0.0, metadata={"help": (
        "weight of the attention-alignment penalty: cross-attention maps, adapted vs frozen (0 = off; 1000 for the MSE "
        "of probabilities, the APT Options node's default, was calibrated on the world model, not on SD).")})
    bins: int = field(default=10, metadata={"help": (
        "timestep bins of the overfitting indicator (a choice: the paper's count was not readable here).")})
    ema: float = field(default=0.9, metadata={"help": "indicator smoothing per update of a bin, in [0, 1)."})
    target: float = field(default=0.0, metadata={"help": (
        "indicator level tolerated before weighting and augmenting (0: every gain counts).")})
    adapt_weight: bool = field(default=True, metadata={"help": "(a) per-bin weight of the fit loss."})
    adapt_augment: bool = field(default=True, metadata={"help": "(b) per-bin augmentation probability."})
    min_weight: float = field(default=0.1, metadata={"help": "floor of the fit weight, so no bin stops learning."})
    max_augment: float = field(default=0.8, metadata={"help": (
        "ceiling of the augmentation probability (some clean samples always remain).")})
    augment_ops: tuple[str, ...] = field(default=("zoom", "rotate"), metadata={"help": (
        f"augmentations, from {', '.join(AUGMENT_OPS)} (the paper: zoom-out and rotation); empty = loss weighting "
        "only. The node takes them comma separated.")})
    zoom: float = field(default=0.25, metadata={"help": "zoom-out: content scaled by a factor drawn in [1 - zoom, 1]."})
    rotate: float = field(default=15.0, metadata={"help": "rotation drawn in [-rotate, rotate] degrees."})
    shift: float = field(default=0.125, metadata={"help": "translation drawn in [-shift, shift] of the side."})
    color: float = field(default=0.1, metadata={"help": (
        "brightness/contrast jitter amplitude (in the model's [-1, 1] image space).")})
    stabilize_layers: str = field(default=SDUNet.apt_stabilize_layers, metadata={"help": (
        "regex (full match) of the UNet modules whose outputs are stabilized.")})
    stabilize_normalize: bool = field(default=True, metadata={"help": (
        "shifts in units of the frozen channel's variance, so every layer counts alike.")})
    align_layers: str = field(default=SDUNet.apt_align_layers, metadata={"help": (
        "regex (full match) of the cross-attention modules aligned (ldm/ComfyUI naming).")})
    align_distance: str = field(default="mse", metadata={"help": (
        "`mse`, or `kl` (KL(frozen || adapted) per query row).")})

    def __post_init__(self):
        self.augment_ops = tuple(self.augment_ops)
        checks = [
            (self.adaptive >= 0 and self.stabilize >= 0 and self.align >= 0,
             f"APT weights must be >= 0 (0 = off), got adaptive={self.adaptive}, stabilize={self.stabilize}, align={self.align}."),
            (self.bins >= 1, f"APT bins must be >= 1, got {self.bins}."),
            (0 <= self.ema < 1, f"APT ema must be in [0, 1), got {self.ema}."),
            (0 <= self.target < 1, f"APT target must be in [0, 1), got {self.target}."),
            (0 < self.min_weight <= 1, f"APT min_weight must be in (0, 1], got {self.min_weight}."),
            (0 <= self.max_augment <= 1, f"APT max_augment must be in [0, 1], got {self.max_augment}."),
            (set(self.augment_ops) <= set(AUGMENT_OPS), f"APT augment_ops must be among {AUGMENT_OPS}, got {self.augment_ops}."),
            (self.align_distance in ("mse", "kl"), f"APT align_distance must be 'mse' or 'kl', got {self.align_distance!r}."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for name in ("stabilize_layers", "align_layers"):
            problem = pattern_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)

    @property
    def active(self) -> bool:
        return bool(self.adaptive or self.stabilize or self.align)


def pattern_problem(field: str, pattern) -> str | None:
    """A layer pattern that is no regular expression, named by its field (a bare re.error named none)."""
    if not isinstance(pattern, str):
        return None
    try:
        re.compile(pattern)
    except re.error as e:
        return (f"APT {field} {pattern!r} is not a valid regular expression ({e}); it is matched against module names, "
                "e.g. '.*attn2' (leave the default to use the family's layers).")
    return None


def metadata(cfg: AptConfig) -> dict[str, str]:
    """Every APT setting for a LoRA file's header (all str, as safetensors metadata must be)."""
    import json

    return {"cat_apt": json.dumps(asdict(cfg), sort_keys=True), "cat_apt_active": str(cfg.active).lower()}
