"""The composition root: what configures a run, and the checks that need more than one of its parts.

`CatLossConfig` is the objective's settings with the settings of every loss-side term on it (APT, auto preservation,
min-SNR, masks); `TrainConfig` the loop's with the weight-side ones (the EMA). The terms registry (terms/registry.py)
reads each term's settings from here (`mask`, `min_snr`, `local_keep`, `ema`: the flat fields as their config
class). Checks that involve two parts (auto preservation needs the CAT term; masks and APT's augmentations exclude
each other) live here and nowhere else; a part's own checks are in its config class.

Each field's metadata documents it (`help`) and says when a run records it (`recorded`, cat_train/options.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..data.prompts import PreservationMode, parse_class_words
from ..options import CHANGED, NEVER, changed_while, when
from ..terms.apt_config import AptConfig
from ..terms.auto_config import AutoPreservationConfig
from ..terms.ema import EmaSettings
from ..terms.keep_local import LocalKeepSettings
from ..terms.mask import MaskSettings
from ..terms.min_snr import MinSnr


@dataclass
class TrainConfig:
    steps: int = field(default=600, metadata={"recorded": when(lambda c: c.lr_schedule == "cosine"), "help": (
        "optimizer steps (the paper: 600).")})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (the paper: 1e-4)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (the paper's)."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas (the paper's)."})
    eps: float = field(default=1e-8, metadata={"help": "AdamW eps (the paper's)."})
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"help": (
        "`constant`, or `cosine` (to 0 at the last step).")})
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps."})
    batch_size: int = field(default=1, metadata={"help": "images per micro-batch (drawn from one aspect bucket)."})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step."})
    seed: int = field(default=0, metadata={"help": (
        "seeds the batch order, timesteps, noise, adapter init and dropout: same seed, same adapter (bit for bit on "
        "CPU).")})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": (
        "autocast dtype of the forward: `no`, `bf16` (GPU or CPU) or `fp16` (GPU only, with a grad scaler); latents, "
        "noise and targets stay fp32.")})
    gradient_checkpointing: bool = field(default=False, metadata={"recorded": NEVER, "help": (
        "recompute UNet blocks in backward: less memory, ~30-60% slower. The ComfyUI trainer's `auto` turns it on "
        "only when the memory budget printed before step 1 says it is needed.")})
    save_every: int = field(default=0, metadata={"recorded": NEVER, "help": (
        "a resumable checkpoint (adapter + optimizer + RNG state) every N steps; 0: only on stop, cancel or error. The "
        "ComfyUI trainer node also writes a loadable file for each saved step into ComfyUI's models folder.")})
    checkpoint_dir: str | None = field(default=None, metadata={"recorded": NEVER, "help": (
        "where checkpoints go (`cat-stepNNNNNN.pt`); None: no checkpoints.")})
    max_grad_norm: float = field(default=0.0,
                                 metadata={"help": "gradient clipping norm; 0 = off (the paper uses none)."})
    device: str | None = field(default=None, metadata={"recorded": NEVER, "help": (
        "where training runs; None: where the module's parameters are.")})
    # options added in 0.2.0 are recorded only when changed (CHANGED), so checkpoints and folders of earlier runs
    # still resume as the same run
    caption_dropout: float = field(default=0.0,
                                   metadata={"recorded": CHANGED, "min": 0.0, "max": 0.99, "step": 0.01, "help": (
        "probability that a drawn image trains on the empty caption '' instead of its own (kohya's "
        "caption_dropout_rate); its CAT keep term is skipped (weight 0), as there is no concept to preserve apart "
        "from. 0 = off.")})
    shuffle_tags: bool = field(default=False, metadata={"recorded": CHANGED, "help": (
        "shuffle the comma-separated tags of each caption (kohya's shuffle_caption), the first `keep_tags` staying in "
        "place; y is made from the shuffled caption, so y_T and y stay a matched pair. Each caption gets "
        "`caption_variants` shuffles, encoded once before step 1.")})
    keep_tags: int = field(default=0, metadata={"recorded": CHANGED, "min": 0, "max": 75, "help": (
        "with shuffle_tags: this many leading tags (e.g. the trigger) keep their place (kohya's keep_tokens).")})
    caption_variants: int = field(default=8, metadata={"recorded": CHANGED, "min": 1, "max": 64, "help": (
        "with shuffle_tags: shuffled versions of each caption encoded before training, one drawn per use; each costs "
        "2 text-encoder calls per image (y_T and y) once, none per step.")})
    timestep_min: int = field(default=0, metadata={"recorded": CHANGED, "min": 0, "max": 999, "help": (
        "lowest training timestep, of 1000 (kohya's min_timestep). SD: integer t drawn uniformly in [min, max); flow "
        "models: the drawn sigma mapped linearly into [min, max] / 1000.")})
    timestep_max: int = field(default=1000, metadata={"recorded": CHANGED, "min": 1, "max": 1000, "help": (
        "highest training timestep (exclusive for SD), of 1000 (kohya's max_timestep); 1000 with min 0 = the full "
        "range, drawn exactly as without the option.")})
    ema_decay: float = field(default=0.0,
                             metadata={"recorded": CHANGED, "min": 0.0, "max": 0.9999, "step": 0.0001, "help": (
        "exponential moving average of the adapter weights (fp32), updated after each optimizer step: shadow = decay "
        "* shadow + (1 - decay) * weights; the weights written (the result and every save_every file) are the average. "
        "0 = off; 0.99-0.999 are usual (about 1/(1 - decay) steps averaged).")})
    ema_start_step: int = field(default=0,
                                metadata={"recorded": changed_while("ema_decay"), "min": 0, "max": 100000, "help": (
        "the average starts here: up to this step it is a copy of the weights, so the untrained start (e.g. zero "
        "up-weights) is not averaged in; 0: from the initial weights.")})

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}; the paper trains 600."),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a finite number > 0, got {self.lr}; the "
                                                     "paper uses 1e-4."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}."),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}."),
            (self.save_every >= 0, f"save_every must be >= 0 (0 = off), got {self.save_every}."),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine', got "
                                                         f"{self.lr_schedule!r}."),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be 'no', 'bf16' or 'fp16', got "
                                                             f"{self.mixed_precision!r}."),
            (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm),
                    f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}."),
            (0 <= self.caption_dropout < 1, "caption_dropout must be in [0, 1) (0 = off; kohya users pick "
                                            f"0.05-0.1), got {self.caption_dropout}."),
            (self.keep_tags >= 0, f"keep_tags must be >= 0, got {self.keep_tags}."),
            (self.caption_variants >= 1, f"caption_variants must be >= 1, got {self.caption_variants}."),
            (0 <= self.timestep_min < self.timestep_max <= 1000,
                    f"timesteps must satisfy 0 <= timestep_min < timestep_max "
             f"<= 1000, got timestep_min {self.timestep_min} and timestep_max {self.timestep_max}; 0 and 1000 = the "
             "full range."),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}; 0.999 averages "
                                      "about 1000 steps."),
            (self.ema_start_step >= 0, f"ema_start_step must be >= 0, got {self.ema_start_step}."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    @property
    def ema(self) -> EmaSettings:
        """ema_decay and ema_start_step as one term config (the terms registry's `ema` entry)."""
        return EmaSettings(self.ema_decay, self.ema_start_step)



@dataclass
class CatLossConfig:
    alpha: float = field(default=1.0, metadata={"help": (
        "CAT factor α (the nodes' `cat_factor`), the weight of the CAT term; 0 = plain LoRA (the preservation passes "
        "are skipped). Must be >= 0; the paper tried 0.5, 1, 1.5 and 2. Not the LoRA alpha (`LoraSpec.alpha`).")})
    preservation: PreservationMode = field(default="class", metadata={"help": (
        "how y is made from the caption y_T: `class` (trigger replaced by the class word: 'sks dog' -> 'dog', not "
        "'dog dog'), `strip` (trigger removed) or `empty` ('').")})
    class_word: str | dict[str, str] = field(default="", metadata={"help": (
        "for `class` preservation: the word that replaces the trigger; one word, or one per trigger "
        "('sks=dog, zwx=cat', or a dict).")})
    token_weights: dict[str, float] = field(default_factory=dict, metadata={"help": (
        "multi-concept: weight of each trigger's preservation term (1.0 if absent; a caption with several triggers "
        "takes their mean). In the node one 'token=weight' per line.")})
    preservation_prompts: tuple[str, ...] = field(default=(), metadata={"help": (
        "optional prompts each image is paired with as y, every one in turn, so the CAT term keeps all of them (e.g. "
        "neighbouring classes a leak scan flagged); empty: y from the caption by the preservation mode. In the node "
        "one prompt per line.")})
    min_snr_gamma: float = field(default=0.0,
                                 metadata={"recorded": CHANGED, "min": 0.0, "max": 100.0, "step": 0.5, "help": (
        "min-SNR-γ weighting of the fit term (Hang et al. 2023; kohya's and diffusers' min_snr_gamma, 5 is the usual "
        "value): eps models min(SNR, γ)/SNR, v models min(SNR, γ)/(SNR + 1), flow models min(SNR, γ)·σ², SNR = "
        "((1-σ)/σ)² (the same x0-space weight). The keep term is not weighted. 0 = off (cat_train/terms/min_snr.py).")})
    apt: AptConfig = field(default_factory=AptConfig, metadata={"help": (
        "APT's regularizers (AptConfig, cat_train/terms/apt.py), all off by default. In ComfyUI an APT Options node "
        "feeds CAT Loss Config's optional `apt` input; the LoRA records them as `cat_apt`.")})
    auto: AutoPreservationConfig = field(default_factory=AutoPreservationConfig, metadata={"help": (
        "auto preservation (AutoPreservationConfig, cat_train/terms/auto.py), off by default: every N steps the "
        "probes' keep drift is measured and the worst are added to the preservation prompts. In ComfyUI an Auto "
        "Preservation node feeds CAT Loss Config's optional `auto` input; the LoRA records the settings and the "
        "probes added.")})
    mask_floor: float = field(default=1.0,
                              metadata={"recorded": CHANGED, "min": 0.0, "max": 1.0, "step": 0.01, "help": (
        "masked training: fit weight of the background (mask 0), the subject weighing 1; 1 = masks off, 0 = the "
        "background is not fitted at all (OneTrainer's default unmasked weight: 0.1). The fit is the mask-weighted "
        "mean over the latent. Masks come from the dataset (<name>-masklabel.png beside the image, else its alpha "
        "channel; docs/dataset.md); images without one weigh 1 everywhere. Not with APT's augmentations.")})
    mask_keep: float = field(default=0.0,
                             metadata={"recorded": CHANGED, "min": 0.0, "max": 100.0, "step": 0.1, "help": (
        "masked training: weight of the background keep term (ai-toolkit's \"inverted-mask prior\"): outside the mask "
        "the adapted prediction on the caption y_T is pulled to the frozen model's on the same y_T, noise and "
        "timestep, so the LoRA does not learn the backgrounds; 0 = off. Runs the frozen y_T pass (as APT does).")})
    keep_every: int = field(default=1, metadata={"recorded": CHANGED, "min": 1, "max": 1000, "help": (
        "cheaper preservation: the CAT term on every k-th step only (steps 1, k+1, 2k+1, ...), weighted α·k so the "
        "expected loss is exact CAT's; the other steps cost a plain LoRA step (no frozen pass, no doubled batch). "
        "1 = every step (exact CAT).")})
    keep_fraction: float = field(default=1.0,
                                 metadata={"recorded": CHANGED, "min": 0.01, "max": 1.0, "step": 0.01, "help": (
        "cheaper preservation: on a step with the CAT term, each batch row gets it with this probability (drawn from "
        "the run's seed), weighted α/p so the expected loss is exact CAT's; rows without it skip the frozen pass and "
        "their adapted y row. 1 = every row (exact CAT).")})
    keep_estimator: Literal["exact", "local"] = field(default="exact", metadata={"recorded": CHANGED, "help": (
        "how the CAT term is computed. `exact`: the paper's, the adapted model's prediction on y against the frozen "
        "one's (a doubled adapted batch: ~2-2.5x a plain step on CPU). `local`: each adapted layer's change on the "
        "input the frozen model feeds it on y, Σ_l w_l·mean||ΔW_l h_l(y)||² (cat_train/terms/keep_local.py): zero "
        "only where CAT's term is zero, but stricter (no change on y in any layer, even one a later layer would "
        "undo), for the frozen pass alone (~1.5x a plain step on CPU). On the world benchmark it kept the class as "
        "exact CAT did with noisier trigger images (docs/world-bench.md). The logged keep is then this term, not the "
        "prediction gap.")})
    keep_local_weights: Literal["unit", "relative"] = field(default="unit", metadata={
        "recorded": lambda options, value, default: value != default and options.keep_estimator == "local",
        "help": (
        "keep_estimator `local`: each layer's weight w_l. `unit`: 1; `relative`: 1/mean||W_l h_l||², each layer's "
        "change relative to what the frozen layer outputs (on the world benchmark it lost the identity in a quarter "
        "of the trigger images at α = 1; unit kept it in all). Not a node widget.")})

    def __post_init__(self):
        if not self.alpha >= 0:  # also catches NaN
            raise ValueError(f"CAT factor alpha must be >= 0 (0 = plain LoRA; the paper used 0.5-2), got {self.alpha}.")
        if self.preservation not in ("empty", "strip", "class"):
            raise ValueError(f"preservation must be 'empty', 'strip' or 'class', got {self.preservation!r}.")
        self.class_word = parse_class_words(self.class_word)
        self.preservation_prompts = tuple(p.strip() for p in self.preservation_prompts if p.strip())
        if isinstance(self.apt, dict):  # as stored in a checkpoint
            self.apt = AptConfig(**self.apt)
        if isinstance(self.auto, dict):
            self.auto = AutoPreservationConfig(**self.auto)
        if self.auto.active and self.alpha == 0:
            raise ValueError("auto preservation adds prompts to the CAT term, which alpha = 0 (plain LoRA) switches "
                             "off; set the CAT factor > 0 or auto preservation `every` to 0.")
        _ = self.min_snr, self.mask, self.local_keep  # each term's settings check themselves when built
        apt = self.apt
        if self.mask.active and apt.adaptive and apt.adapt_augment and apt.augment_ops:
            raise ValueError("masked training (mask_floor < 1 or mask_keep > 0) weights the latent where the image's "
                             "mask is, which APT's augmentations move; turn one off: APT's augment_ops empty (or "
                             "adapt_augment off), or mask_floor 1 and mask_keep 0.")
        if isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 1:
            raise ValueError("keep_every must be a whole number >= 1 (1 = the CAT term on every step), got "
                             f"{self.keep_every!r}.")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError("keep_fraction must be in (0, 1] (1 = the CAT term on every row), got "
                             f"{self.keep_fraction!r}.")
        if self.alpha == 0 and (self.keep_every != 1 or self.keep_fraction != 1):
            raise ValueError("keep_every and keep_fraction thin out the CAT term, which alpha = 0 (plain LoRA) "
                             "switches off; set both to 1, or the CAT factor > 0.")
        bad = {t: w for t, w in self.token_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"token weights must be >= 0, got {bad}.")

    @property
    def mask(self) -> MaskSettings:
        """The masked-training settings as one term config (the terms registry's `mask` entry)."""
        return MaskSettings(self.mask_floor, self.mask_keep)

    @property
    def local_keep(self) -> LocalKeepSettings:
        """keep_estimator and keep_local_weights as one term config (the terms registry's `local_keep` entry)."""
        return LocalKeepSettings(self.keep_estimator, self.keep_local_weights)

    @property
    def min_snr(self) -> MinSnr:
        """min_snr_gamma as one term config (the terms registry's `min_snr` entry)."""
        return MinSnr(self.min_snr_gamma)


EMA_REFUSED = 0.9  # the untrained start's share of the average above which the LoRA is all but empty (< 10%)
EMA_WARNED = 0.5
AUTO_COST_WARNED = 0.5  # auto preservation's measurements, as a share of the training's own compute


def check_run(cfg: TrainConfig, loss_cfg: CatLossConfig, images: int | None = None) -> list[str]:
    """Settings each valid alone that together train something other than they say. Refused (a ValueError naming the
    inputs and the fix) where the run would be wasted or recorded as what it is not; otherwise the warnings, for the
    host to show before step 1. images: the dataset's image count, for auto preservation's cost (None: not judged)."""
    warnings = _ema_warnings(cfg)
    if not cfg.shuffle_tags and (cfg.keep_tags or cfg.caption_variants != 8):
        given = " and ".join(s for s in (f"keep_tags {cfg.keep_tags}" if cfg.keep_tags else "",
                                         f"caption_variants {cfg.caption_variants}" if cfg.caption_variants != 8
                                         else "") if s)
        warnings.append(f"{given} {'do' if ' and ' in given else 'does'} nothing while shuffle_tags is off: captions "
                        "are used as they are. Turn shuffle_tags on (CAT Training Options) to shuffle them, or leave "
                        "these at their defaults (keep_tags 0, caption_variants 8).")
    if loss_cfg.alpha > 0 and 1 < loss_cfg.keep_every >= cfg.steps:
        raise ValueError(f"keep_every {loss_cfg.keep_every} with {cfg.steps} steps puts the CAT term on step 1 only, "
                         "where the LoRA is still zero and the term has nothing to hold: the run would be a plain LoRA "
                         f"recorded as CAT (factor {loss_cfg.alpha}). Use keep_every of at most "
                         f"{max(1, cfg.steps // 10)} (the term on 10 steps or more), or cat_factor 0 for a plain LoRA.")
    auto = loss_cfg.auto
    if auto.active:
        start = auto.first or auto.every  # the first measurement's step (`first` 0: at `every`)
        if start >= cfg.steps:
            what = f"`first` {auto.first}" if auto.first else f"`every` {auto.every}"
            raise ValueError(f"auto preservation {what} with {cfg.steps} steps "
                             + ("never measures" if start > cfg.steps else "measures only after the last step")
                             + ", so it adds no prompt and the run is as without it; set `every` to at most "
                             f"{max(1, cfg.steps // 4)} (a few measurements in the run), or 0 to turn it off.")
        warnings += _auto_warnings(cfg, loss_cfg, images)
    return warnings


def _ema_warnings(cfg: TrainConfig) -> list[str]:
    if not cfg.ema_decay:
        return []
    if cfg.ema_start_step >= cfg.steps:
        raise ValueError(f"ema_start_step {cfg.ema_start_step} is at or past the last step ({cfg.steps}): the average "
                         "would never start, yet the LoRA would be recorded as EMA-averaged. Set ema_start_step below "
                         f"steps (e.g. {cfg.steps // 2}), or ema_decay 0 to train without EMA.")
    span = cfg.steps - cfg.ema_start_step
    share = cfg.ema_decay ** span  # what the shadow holds of the weights before the average started
    if share <= EMA_WARNED:
        return []
    start = ("the untrained start (a zero LoRA)" if cfg.ema_start_step == 0
             else f"the weights of step {cfg.ema_start_step}")
    fit = math.floor(0.05 ** (1 / span) * 1000) / 1000  # the start's share down to 5%
    fix = (f"ema_decay {fit} or lower (about {round(1 / (1 - fit))} steps averaged)" if fit >= 0.5 else "ema_decay 0")
    text = (f"ema_decay {cfg.ema_decay} over {span} averaged step{'s' * (span != 1)} (steps {cfg.steps}, "
            f"ema_start_step {cfg.ema_start_step}) averages about {round(1 / (1 - cfg.ema_decay))} steps: "
            f"{start} would still weigh {share:.1%} of the result")
    if cfg.ema_start_step == 0:
        text += (f", so the LoRA would hold about {1 - share:.1%} of what it learns (less while the weights still "
                 "grow)")
    if share > EMA_REFUSED:
        raise ValueError(f"{text}. Use {fix}, or more steps.")
    return [f"{text}; {fix} keeps it under 5%."]


def _auto_warnings(cfg: TrainConfig, loss_cfg: CatLossConfig, images: int | None) -> list[str]:
    from ..terms.auto_config import probe_words

    auto = loss_cfg.auto
    # nearest: the words are chosen by ranking at the start of the run, `neighbours` of them per class word
    probes = auto.neighbours if auto.source == "nearest" else len(probe_words(auto, loss_cfg.class_word))
    if images is None or not probes:
        return []
    measured = min(images, auto.images) if auto.images else images
    rounds = cfg.steps // auto.every
    per_round = probes * measured * auto.points  # no-grad adapted forwards (the frozen ones once per run)
    # a training step: per image the adapted y_T and y rows forward and backward (~3 forwards each) and the frozen y
    training = cfg.steps * cfg.batch_size * cfg.grad_accum * (7 if loss_cfg.alpha > 0 else 3)
    ratio = rounds * per_round / training
    if ratio <= AUTO_COST_WARNED:
        return []
    return [f"auto preservation: {probes} probes x {measured} images x {auto.points} points = {per_round} UNet "
            f"forwards per measurement, {rounds} measurements (every {auto.every} of {cfg.steps} steps): about "
            f"{ratio:.1f}x the compute of the training itself, and up to {probes * images} probe prompts to encode "
            "before step 1. To spend less: fewer probes (the neighbours of the class word a leak scan flags), a larger "
            "`every`, or fewer `images` or `points`."]
