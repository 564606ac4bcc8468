"""APT's settings (cat_train/apt.py describes the method), apart from the plug-in itself.

A leaf: `loss.CatLossConfig` carries an `AptConfig` without the objective importing the regularizer that
plugs into it (apt.py imports loss.py's protocol, never the reverse).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

AUGMENT_OPS = ("flip", "zoom", "rotate", "shift", "color")


@dataclass
class AptConfig:
    adaptive: float = 0.0     # gain of the per-bin response to the overfitting indicator; 0 = off
    stabilize: float = 0.0    # weight of the representation-stabilization penalty; 0 = off
    align: float = 0.0        # weight of the attention-alignment penalty; 0 = off
    bins: int = 10            # timestep bins of the indicator (choice: the paper's count was not readable here)
    ema: float = 0.9          # indicator smoothing per update of a bin
    target: float = 0.0       # indicator level tolerated before weighting/augmenting (0: every gain counts)
    adapt_weight: bool = True    # (a) per-bin weight of the fit loss
    adapt_augment: bool = True   # (b) per-bin augmentation probability
    min_weight: float = 0.1   # floor of the fit weight, so no bin stops learning
    max_augment: float = 0.8  # ceiling of the augmentation probability (some clean samples always remain)
    augment_ops: tuple[str, ...] = ("zoom", "rotate")  # the paper's affine pair; + "flip", "shift", "color"
    zoom: float = 0.25        # zoom-out: content scaled by a factor drawn in [1 - zoom, 1]
    rotate: float = 15.0      # rotation drawn in [-rotate, rotate] degrees
    shift: float = 0.125      # translation drawn in [-shift, shift] of the side
    color: float = 0.1        # brightness/contrast jitter amplitude (in the model's [-1, 1] image space)
    stabilize_layers: str = r"middle_block|output_blocks\.\d+"  # regex, full match of module names
    stabilize_normalize: bool = True  # shifts in units of the frozen channel's variance: every layer counts alike
    align_layers: str = r".*\.attn2"  # cross-attention modules (ldm/ComfyUI naming)
    align_distance: str = "mse"       # "mse" or "kl" (KL(frozen || adapted) per query row)

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
        for pattern in (self.stabilize_layers, self.align_layers):
            re.compile(pattern)

    @property
    def active(self) -> bool:
        return bool(self.adaptive or self.stabilize or self.align)


def metadata(cfg: AptConfig) -> dict[str, str]:
    """Every APT setting for a LoRA file's header (all str, as safetensors metadata must be)."""
    import json

    return {"cat_apt": json.dumps(asdict(cfg), sort_keys=True), "cat_apt_active": str(cfg.active).lower()}
