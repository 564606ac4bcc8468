"""APT's settings (cat_train/terms/apt.py describes the method and holds the term), and the term they build.

Its default layers are family knowledge (`families`); the composition root (training/config.py) carries an
`AptConfig` on `CatLossConfig`, and the terms registry builds the term from it.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from ..families import SDUNet
from .apt import AptRun

AUGMENT_OPS = ("flip", "zoom", "rotate", "shift", "color")
FORMS = ("paper", "relative")
FILLS = ("black", "reflection")
STATS = ("std", "var")


@dataclass
class AptConfig:
    adaptive: float = field(default=0.0, metadata={"help": (
        "gain of the per-timestep-bin response to the overfitting indicator o_b: fit weight 1 - gain*o_b, augmentation "
        "probability gain*o_b (0 = off; 1 = the paper's response).")})
    form: str = field(default="paper", metadata={"help": (
        "overfitting indicator. `paper`: o_b = 1 - exp(-T (EMA_b[L_pre] - EMA_b[L_ft])), each loss smoothed on its "
        "own, T the diffusion steps (two independent write-ups of the method section); `relative`: EMA_b of "
        "(L_pre - L_ft) / L_pre (this pack's earlier choice: a 95% error drop for what a gap of 0.003 gives the "
        "paper's).")})
    stabilize: float = field(default=0.0, metadata={"help": (
        "weight of the representation-stabilization penalty: shift of per-channel feature mean/variance, adapted vs "
        "frozen (0 = off; 5, the APT Options node's default, was calibrated on the world model, not on SD).")})
    align: float = field(default=0.0, metadata={"help": (
        "weight of the attention-alignment penalty: cross-attention maps, adapted vs frozen (0 = off; 1000 for the MSE "
        "of probabilities, the APT Options node's default, was calibrated on the world model, not on SD).")})
    bins: int = field(default=10, metadata={"help": (
        "timestep bins of the overfitting indicator (10: the write-ups of the paper's method section).")})
    ema: float = field(default=0.9, metadata={"help": (
        "indicator smoothing per update of a bin, in [0, 1): new-value weight 1 - ema (0.1 in the write-ups). `paper` "
        "starts each EMA from its first value, `relative` from 0.")})
    target: float = field(default=0.0, metadata={"help": (
        "indicator level tolerated before weighting and augmenting (0: every gain counts).")})
    adapt_weight: bool = field(default=True, metadata={"help": "(a) per-bin weight of the fit loss."})
    adapt_augment: bool = field(default=True, metadata={"help": "(b) per-bin augmentation probability."})
    min_weight: float = field(default=0.1, metadata={"help": (
        "floor of the fit weight in the `relative` form, so no bin stops learning (the `paper` form: 1 - o_b, no "
        "floor).")})
    max_augment: float = field(default=0.8, metadata={"help": (
        "p_max, ceiling of the augmentation probability min(o_b, p_max) (the paper's value is unknown here; 0.8 is "
        "a choice).")})
    augment_ops: tuple[str, ...] = field(default=("zoom", "rotate"), metadata={"help": (
        f"augmentations, from {', '.join(AUGMENT_OPS)} (the paper: zoom-out and rotation); empty = loss weighting "
        "only. The node takes them comma separated.")})
    zoom_out: float = field(default=3.0, metadata={"help": (
        "zoom-out: the largest factor f, drawn in [1, zoom_out], content scaled by 1/f (the authors' figure: 1-3x); "
        "0 = the earlier range, `zoom`.")})
    zoom: float = field(default=0.25, metadata={"help": (
        "with zoom_out 0 (this pack's earlier choice): content scaled by a factor drawn in [1 - zoom, 1].")})
    fill: str = field(default="black", metadata={"help": (
        "what surrounds zoomed-out or turned content: `black` (the authors' figure: the subject on black; in a latent "
        "space without an image space, e.g. SD's VAE latents, 0 in the latent) or `reflection` (earlier: mirrored "
        "copies).")})
    rotate: float = field(default=15.0, metadata={"help": "rotation drawn in [-rotate, rotate] degrees."})
    shift: float = field(default=0.125, metadata={"help": "translation drawn in [-shift, shift] of the side."})
    color: float = field(default=0.1, metadata={"help": (
        "brightness/contrast jitter amplitude (in the model's [-1, 1] image space).")})
    stabilize_layers: str = field(default=SDUNet.apt_stabilize_layers, metadata={"help": (
        "regex (full match) of the UNet modules whose outputs are stabilized (default: the self-attention modules, as "
        "the authors' figure; which of them the paper uses is unknown here. Earlier: "
        "`middle_block|output_blocks\\.\\d+`).")})
    stabilize_stat: str = field(default="std", metadata={"help": (
        "per-channel statistic beside the mean: `std` (the write-ups) or `var` (earlier).")})
    stabilize_normalize: bool = field(default=False, metadata={"help": (
        "shifts in units of the frozen channel's variance, so every layer counts alike (earlier choice); off: plain L2 "
        "(the write-ups).")})
    align_layers: str = field(default=SDUNet.apt_align_layers, metadata={"help": (
        "regex (full match) of the cross-attention modules aligned (ldm/ComfyUI naming).")})
    align_distance: str = field(default="mse", metadata={"help": (
        "`mse`, or `kl` (KL(frozen || adapted) per query row). The paper's distance is unknown here.")})
    align_skip_triggers: bool = field(default=False, metadata={"help": (
        "leave the trigger tokens' columns out of the alignment: the frozen model never saw the trigger, so aligning "
        "its map pulls against learning the subject (the authors' prompts use class nouns, no trigger). Needs the "
        "trigger's token positions (`Example.trigger_tokens`); a batch without them aligns every token.")})

    def __post_init__(self):
        self.augment_ops = tuple(self.augment_ops)
        checks = [
            (self.adaptive >= 0 and self.stabilize >= 0 and self.align >= 0,
             f"APT weights must be >= 0 (0 = off), got adaptive={self.adaptive}, stabilize={self.stabilize}, "
             f"align={self.align}."),
            (self.bins >= 1, f"APT bins must be >= 1, got {self.bins}."),
            (0 <= self.ema < 1, f"APT ema must be in [0, 1), got {self.ema}."),
            (0 <= self.target < 1, f"APT target must be in [0, 1), got {self.target}."),
            (0 < self.min_weight <= 1, f"APT min_weight must be in (0, 1], got {self.min_weight}."),
            (0 <= self.max_augment <= 1, f"APT max_augment must be in [0, 1], got {self.max_augment}."),
            (set(self.augment_ops) <= set(AUGMENT_OPS), f"APT augment_ops must be among {AUGMENT_OPS}, got "
                                                        f"{self.augment_ops}."),
            (self.align_distance in ("mse", "kl"), "APT align_distance must be 'mse' or 'kl', got "
                                                   f"{self.align_distance!r}."),
            (self.form in FORMS, f"APT form must be one of {FORMS}, got {self.form!r}."),
            (self.fill in FILLS, f"APT fill must be one of {FILLS}, got {self.fill!r}."),
            (self.stabilize_stat in STATS, f"APT stabilize_stat must be one of {STATS}, got {self.stabilize_stat!r}."),
            (self.zoom_out == 0 or self.zoom_out >= 1, "APT zoom_out must be 0 (use zoom) or >= 1, got "
                                                       f"{self.zoom_out}."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for name in ("stabilize_layers", "align_layers"):
            problem = pattern_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)

    @classmethod
    def earlier(cls, **kw) -> "AptConfig":
        """This pack's choices before the paper's form became the default (relative indicator, zoom-out to 1.33x with
        reflection padding, block outputs' mean and variance in units of the frozen variance); `kw` overrides."""
        return cls(**{**EARLIER, **kw})

    @property
    def active(self) -> bool:
        return bool(self.adaptive or self.stabilize or self.align)

    def metadata(self, history=()) -> dict[str, str]:
        """Every APT setting for a LoRA file's header (all str, as safetensors metadata must be)."""
        return {"cat_apt": json.dumps(asdict(self), sort_keys=True), "cat_apt_active": str(self.active).lower()}

    def build(self, denoiser, adapter=None) -> AptRun:
        return AptRun(denoiser, self)


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


EARLIER = dict(form="relative", zoom_out=0.0, fill="reflection", stabilize_layers=SDUNet.apt_block_layers,
               stabilize_stat="var", stabilize_normalize=True)
