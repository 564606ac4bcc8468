"""The CAT training loop: AdamW on the adapter only, checkpoints that resume bit-exactly, clean stops.

What is trained is a `plugins.Adapter` (built from a spec by `adapters.adapter_for`, or passed in) and what else
the loss weighs are `plugins.StepTerm`s built from the loss config (`regularizers`): the loop names neither.

One `torch.Generator` (seeded by `TrainConfig.seed`) draws every batch, timestep and noise, and
the global RNG (adapter dropout) is forked and seeded too; both go into checkpoints, so a run resumed
from step k continues exactly as the uninterrupted run would have (bit for bit on CPU).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from ..data import captions as caption_rows
from ..adapters.registry import AdapterSpec, adapter_for
from ..data.captions import CaptionChoice
from ..step.denoiser import Cond, Denoiser, FlowSchedule, NoiseSchedule
from ..step.objective import CatLossConfig, cat_objective, preservation_rows, repeat_to_common_length
from ..step.plugs import Adapter, StepTerm
from ..terms.auto_config import image_probes, probe_words
from ..data.prompts import class_word_for, preservation_prompt
from ..terms.registry import step_terms
from ..terms.weight_terms import weight_terms
from .run_folder import (atomic_save, check_resume, check_space, checkpoint_bytes, claim_or_own, data_fingerprint,
                         result_settings, writable_folder)

log = logging.getLogger("cat_train")
CHECKPOINT_FORMAT = "cat_train.checkpoint/1"


@dataclass
class TrainConfig:
    steps: int = field(default=600, metadata={"help": "optimizer steps (the paper: 600)."})
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
        "seeds the batch order, timesteps, noise, adapter init and dropout: same seed, same adapter (bit for bit on CPU).")})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": (
        "autocast dtype of the forward: `no`, `bf16` (GPU or CPU) or `fp16` (GPU only, with a grad scaler); latents, "
        "noise and targets stay fp32.")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "recompute UNet blocks in backward: less memory, ~30-60% slower. The ComfyUI trainer's `auto` turns it on "
        "only when the memory budget printed before step 1 says it is needed.")})
    save_every: int = field(default=0, metadata={"help": (
        "a resumable checkpoint (adapter + optimizer + RNG state) every N steps; 0: only on stop, cancel or error. The "
        "ComfyUI trainer node also writes a loadable file for each saved step into ComfyUI's models folder.")})
    checkpoint_dir: str | None = field(default=None, metadata={"help": (
        "where checkpoints go (`cat-stepNNNNNN.pt`); None: no checkpoints.")})
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping norm; 0 = off (the paper uses none)."})
    device: str | None = field(default=None, metadata={"help": (
        "where training runs; None: where the module's parameters are.")})
    # options added in 0.2.0 ("since"): while at their default a run's recorded settings leave them out
    # (run_folder.result_settings), so checkpoints and folders of earlier runs still resume as the same run
    caption_dropout: float = field(default=0.0, metadata={"since": "0.2.0", "min": 0.0, "max": 0.99, "step": 0.01, "help": (
        "probability that a drawn image trains on the empty caption '' instead of its own (kohya's caption_dropout_rate); "
        "its CAT keep term is skipped (weight 0), as there is no concept to preserve apart from. 0 = off.")})
    shuffle_tags: bool = field(default=False, metadata={"since": "0.2.0", "help": (
        "shuffle the comma-separated tags of each caption (kohya's shuffle_caption), the first `keep_tags` staying in "
        "place; y is made from the shuffled caption, so y_T and y stay a matched pair. Each caption gets "
        "`caption_variants` shuffles, encoded once before step 1.")})
    keep_tags: int = field(default=0, metadata={"since": "0.2.0", "min": 0, "max": 75, "help": (
        "with shuffle_tags: this many leading tags (e.g. the trigger) keep their place (kohya's keep_tokens).")})
    caption_variants: int = field(default=8, metadata={"since": "0.2.0", "min": 1, "max": 64, "help": (
        "with shuffle_tags: shuffled versions of each caption encoded before training, one drawn per use; each costs "
        "2 text-encoder calls per image (y_T and y) once, none per step.")})
    timestep_min: int = field(default=0, metadata={"since": "0.2.0", "min": 0, "max": 999, "help": (
        "lowest training timestep, of 1000 (kohya's min_timestep). SD: integer t drawn uniformly in [min, max); flow "
        "models: the drawn sigma mapped linearly into [min, max] / 1000.")})
    timestep_max: int = field(default=1000, metadata={"since": "0.2.0", "min": 1, "max": 1000, "help": (
        "highest training timestep (exclusive for SD), of 1000 (kohya's max_timestep); 1000 with min 0 = the full "
        "range, drawn exactly as without the option.")})
    ema_decay: float = field(default=0.0, metadata={"since": "0.2.0", "min": 0.0, "max": 0.9999, "step": 0.0001, "help": (
        "exponential moving average of the adapter weights (fp32), updated after each optimizer step: shadow = decay "
        "* shadow + (1 - decay) * weights; the weights written (the result and every save_every file) are the average. "
        "0 = off; 0.99-0.999 are usual (about 1/(1 - decay) steps averaged).")})
    ema_start_step: int = field(default=0, metadata={"since": "0.2.0", "min": 0, "max": 100000, "help": (
        "the average starts here: up to this step it is a copy of the weights, so the untrained start (e.g. zero "
        "up-weights) is not averaged in; 0: from the initial weights.")})

    def __post_init__(self):
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}; the paper trains 600."),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a finite number > 0, got {self.lr}; the paper uses 1e-4."),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}."),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}."),
            (self.save_every >= 0, f"save_every must be >= 0 (0 = off), got {self.save_every}."),
            (self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}."),
            (self.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}."),
            (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm), f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}."),
            (0 <= self.caption_dropout < 1, f"caption_dropout must be in [0, 1) (0 = off; kohya users pick 0.05-0.1), got {self.caption_dropout}."),
            (self.keep_tags >= 0, f"keep_tags must be >= 0, got {self.keep_tags}."),
            (self.caption_variants >= 1, f"caption_variants must be >= 1, got {self.caption_variants}."),
            (0 <= self.timestep_min < self.timestep_max <= 1000, f"timesteps must satisfy 0 <= timestep_min < timestep_max "
             f"<= 1000, got timestep_min {self.timestep_min} and timestep_max {self.timestep_max}; 0 and 1000 = the full range."),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}; 0.999 averages about 1000 steps."),
            (self.ema_start_step >= 0, f"ema_start_step must be >= 0, got {self.ema_start_step}."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class Example:
    """One training image: its cached latent and the cached conditionings of y_T and y."""
    latent: Tensor          # (C, H, W)
    cond_token: Cond        # unbatched: {"context": (L, C), ...}
    cond_pres: Cond
    weight: float = 1.0     # weight of its preservation term (per-token weights)
    repeats: int = 1        # sampling weight (kohya repeats)
    prompts: tuple[str, str] | None = None  # (y_T, y) for adapters that encode prompts every step (no cached conds)
    probes: dict[str, Cond] = field(default_factory=dict)  # auto preservation: {probe: its prompt's cond} for this image
    trigger_tokens: tuple[int, ...] = ()  # positions of the trigger's tokens in y_T's context, for step terms that skip them
    captions: CaptionChoice | None = None  # caption dropout / tag shuffling: which row a draw of this image uses
    drawn: bool = True  # False: a caption row (shuffled or dropped caption), reached only through an image's `captions`
    mask: Tensor | None = None  # (1, H, W) at the latent's size in [0, 1], 1 = subject: masked training (cat_train/terms/mask.py)


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    fit: float
    keep: float
    lr: float
    elapsed: float
    reports: dict[str, dict] = field(default_factory=dict)  # each plugged-in regularizer's report(), by its name


@dataclass
class TrainResult:
    weights: Any  # the adapter's `weights()`
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    last_checkpoint: Path | None = None
    warnings: list[str] = field(default_factory=list)  # also logged; for a host to show beside the summary


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, checkpoint: Path | None):
        where = f"the last good state is saved in {checkpoint}" if checkpoint else "set checkpoint_dir to keep the last good state"
        super().__init__(f"loss became NaN/inf at step {step}; training stopped before the bad update, {where}. "
                         "Lower the learning rate, use mixed_precision 'bf16' instead of 'fp16', or set max_grad_norm (e.g. 1.0).")
        self.step, self.checkpoint = step, checkpoint


class TrainingOutOfMemory(RuntimeError):
    pass


PAIRS_WARN = 5000  # image x preservation-prompt pairs past which the preparation time is worth a line


def build_examples(items: Sequence[tuple], encode_text: Callable[[list[str]], Cond], loss_cfg: CatLossConfig,
                   progress: Callable[[int, int], None] | None = None,
                   token_positions: Callable[[str, tuple[str, ...]], tuple[int, ...]] | None = None,
                   cfg: TrainConfig | None = None) -> list[Example]:
    """items: (latent, caption, triggers[, repeats[, mask]]), mask (1, H, W) at the latent's size or None. Each distinct
    prompt is encoded once; progress(done, total) after each (a host moves its bar and stops at Cancel there).
    Examples share their conditionings.
    token_positions(caption, triggers): where the host's tokenizer puts the trigger's tokens in the caption's context
    (Example.trigger_tokens). cfg: its caption_dropout / shuffle_tags add each image's caption rows after the
    images' own examples (cat_train/data/captions.py)."""
    rows = [(it[0], it[1], tuple(it[2]), it[3] if len(it) > 3 else 1) for it in items]
    masks = [it[4] if len(it) > 4 else None for it in items]
    if loss_cfg.preservation_prompts:  # every image with every listed y: the CAT term keeps each of them
        pres = [list(loss_cfg.preservation_prompts) for _ in rows]
        pairs = len(rows) * len(loss_cfg.preservation_prompts)
        if pairs > PAIRS_WARN:
            log.warning("%d images x %d preservation prompts = %d training examples (each prompt encoded once, the "
                        "examples share them); a few dozen prompts are usually enough.", len(rows),
                        len(loss_cfg.preservation_prompts), pairs)
    else:
        pres = [[preservation_prompt(cap, trig, loss_cfg.preservation, loss_cfg.class_word)] for _, cap, trig, _ in rows]
    probes = [_probe_prompts(loss_cfg, cap, trig, ps[0]) for (_, cap, trig, _), ps in zip(rows, pres)]
    with_rows = caption_rows.active(cfg)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed) if with_rows else None  # not the run's: it exists only in train()
    # per image, per example of it: [(y_T, y)] of each caption variant
    pairs = [[[(v, p if loss_cfg.preservation_prompts else preservation_prompt(v, trig, loss_cfg.preservation,
                                                                                 loss_cfg.class_word))
               for v in vs] for p in ps]
             for (_, cap, trig, _), ps, vs in zip(rows, pres, [caption_rows.variants(r[1], cfg, shuffle_gen) for r in rows])
             ] if with_rows else []
    extra = {p for per_image in pairs for per_ex in per_image for pair in per_ex for p in pair} | ({""} if with_rows else set())
    prompts = sorted({cap for _, cap, _, _ in rows} | {p for ps in pres for p in ps} | {p for pr in probes for p in pr.values()}
                     | extra)
    # one prompt per call: a batch would pad every prompt to the longest, changing short captions' conditioning
    cond = {}
    for i, p in enumerate(prompts):
        cond[p] = {k: v[0].detach().cpu() for k, v in encode_text([p]).items()}
        if progress:
            progress(i + 1, len(prompts))

    def weight(trig: tuple[str, ...]) -> float:
        return sum(loss_cfg.token_weights.get(t, 1.0) for t in trig) / len(trig) if trig else 1.0

    out = []
    for (lat, cap, trig, rep), ps, pr, mask in zip(rows, pres, probes, masks):
        image_probes = {name: cond[p] for name, p in pr.items()}  # one dict per image: its rows share it
        tokens = tuple(token_positions(cap, trig)) if token_positions and trig else ()
        if mask is not None and tuple(mask.shape[-2:]) != tuple(lat.shape[-2:]):
            raise ValueError(f"the mask of {cap!r} is {tuple(mask.shape[-2:])}, its latent {tuple(lat.shape[-2:])}; "
                             "bring masks to the latent's size (cat_train.terms.mask.latent_mask).")
        mask = None if mask is None else mask.detach().float().cpu().reshape(1, *lat.shape[-2:])
        out += [Example(lat.detach().cpu(), cond[cap], cond[p], weight(trig), rep, probes=image_probes,
                        trigger_tokens=tokens, mask=mask) for p in ps]
    if with_rows:
        out = _with_caption_rows(out, rows, pairs, cond, weight, cfg, token_positions)
    return out


def _with_caption_rows(out: list[Example], rows, pairs, cond, weight, cfg: TrainConfig, token_positions) -> list[Example]:
    """The examples, each given its CaptionChoice, followed by their caption rows (`drawn=False`)."""
    extra: list[Example] = []
    primary = iter(enumerate(out))
    for (_, _, trig, _), per_image in zip(rows, pairs):
        for per_ex in per_image:
            i, ex = next(primary)
            start = len(out) + len(extra)
            extra += [Example(ex.latent, cond[v], cond[y], weight(trig), ex.repeats, probes=ex.probes, drawn=False,
                              trigger_tokens=tuple(token_positions(v, trig)) if token_positions and trig else ())
                      for v, y in per_ex] if cfg.shuffle_tags else []
            variant_rows = tuple(range(start, len(out) + len(extra))) or (i,)  # not shuffling: its own caption
            dropped = None
            if cfg.caption_dropout > 0:  # no concept in "": nothing to keep apart from, keep weight 0
                dropped = len(out) + len(extra)
                extra.append(Example(ex.latent, cond[""], cond[""], 0.0, ex.repeats, probes=ex.probes, drawn=False))
            ex.captions = CaptionChoice(cfg.caption_dropout, dropped, variant_rows)
    return out + extra


def _probe_prompts(loss_cfg: CatLossConfig, caption: str, triggers: tuple[str, ...], y: str) -> dict[str, str]:
    """Auto preservation's {probe: prompt} for one image (none while it is off): cat_train/terms/auto_config.py."""
    if not loss_cfg.auto.active:
        return {}
    own = ([class_word_for(t, loss_cfg.class_word) for t in triggers] if loss_cfg.preservation == "class" and triggers
           else [])
    return image_probes(y, own, probe_words(loss_cfg.auto, loss_cfg.class_word))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    progress = max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class BatchSampler:
    """Draws same-shape (same bucket) batches, each example weighted by its repeats."""

    def __init__(self, examples: Sequence[Example], batch_size: int, timesteps: tuple[int, int | None] = (0, None)):
        self.examples, self.batch_size, self.timesteps = examples, batch_size, timesteps
        groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(examples):
            if ex.drawn:  # caption rows come only through their image's CaptionChoice
                groups.setdefault(tuple(ex.latent.shape), []).append(i)
        self.groups = list(groups.values())
        self.group_weights = torch.tensor([sum(examples[i].repeats for i in g) for g in self.groups], dtype=torch.float64)

    def draw(self, gen: torch.Generator) -> list[int]:
        group = self.groups[int(torch.multinomial(self.group_weights, 1, generator=gen))]
        w = torch.tensor([self.examples[i].repeats for i in group], dtype=torch.float64)
        picks = torch.multinomial(w, self.batch_size, replacement=len(group) < self.batch_size, generator=gen)
        return [group[int(i)] for i in picks]

    def draw_batch(self, gen: torch.Generator, schedule: NoiseSchedule | FlowSchedule) -> tuple[list[int], Tensor, Tensor]:
        """Examples (each image's caption row where it has a choice), timesteps in the range and noise of one batch (on
        the CPU), in the order this sampler draws them."""
        idx = caption_rows.pick_rows(self.examples, self.draw(gen), gen)
        t = schedule.sample_t(len(idx), gen, *self.timesteps)
        return idx, t, torch.randn((len(idx), *self.examples[idx[0]].latent.shape), generator=gen)


def _collate(examples: Sequence[Example], idx: list[int], device: torch.device, dtype: torch.dtype,
             pres: list[Cond] | None = None):
    batch = [examples[i] for i in idx]
    stack = lambda conds: {k: torch.stack(repeat_to_common_length([c[k] for c in conds], 0) if k == "context" else
                                          [c[k] for c in conds]).to(device, dtype) for k in conds[0]}
    return (torch.stack([b.latent for b in batch]).to(device, dtype), stack([b.cond_token for b in batch]),
            stack(pres or [b.cond_pres for b in batch]), torch.tensor([b.weight for b in batch], device=device))


def _atomic_save(obj, path: Path) -> Path:
    return atomic_save(obj, path, "free space on that disk or point checkpoint_dir (the node's checkpoint_name) elsewhere.")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint this trainer wrote, or a ValueError saying the file is something else.

    Checkpoints hold tensors and plain data only, so torch's safe loader reads them all; its failure on
    another file is reported without torch's advice to unpickle unrestricted, which would run any code
    a stranger's file carries.
    """
    what = f"{path} is not a CAT training checkpoint (cat-stepNNNNNN.pt written by this trainer)"
    hint = "; resume from a cat-stepNNNNNN.pt in the run's checkpoint folder, or start afresh without one."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # pickle, zip and format errors alike: the file is not ours
        if _looks_like_checkpoint(path):  # our name and torch's zip header: written by us and cut short
            raise ValueError(_damaged(path, e)) from None
        raise ValueError(f"{what}: torch cannot read it as one ({type(e).__name__}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = (f"a {type(state).__name__}" if not isinstance(state, dict) else
                 "a dict without the trainer's 'format' key" if "format" not in state else f"format {state['format']!r}")
        raise ValueError(f"{what}: it holds {found}, not {CHECKPOINT_FORMAT!r}{hint}")
    return state


def _looks_like_checkpoint(path) -> bool:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return p.name.startswith("cat-step") and head == b"PK\x03\x04"


def _damaged(path, e: BaseException) -> str:
    p = Path(path)
    earlier = [q for q in sorted(p.parent.glob("cat-step*.pt"), reverse=True) if q.name < p.name and _readable_zip(q)]
    where = (f"resume from the previous checkpoint {earlier[0]}" if earlier else
             "no earlier checkpoint in its folder reads back: start afresh without resume_from")
    return (f"checkpoint {p} is damaged: it starts like one of this trainer's checkpoints but is cut short or corrupt "
            f"({type(e).__name__}), e.g. a save interrupted by a full disk or a crash; {where}.")


def _readable_zip(p: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"cat-step{step:06d}.pt"


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = sorted(Path(directory).glob("cat-step*.pt"))
    return found[-1] if found else None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def train(denoiser: Denoiser, examples: Sequence[Example], loss_cfg: CatLossConfig, spec: AdapterSpec | Adapter,
          cfg: TrainConfig, callback: Callable[[StepInfo], None] | None = None, resume: str | os.PathLike | None = None,
          keep_adapter: bool = False, on_save: Callable[[int, Any], None] | None = None,
          sampler: BatchSampler | None = None, own_folder: bool = False, extra_terms: Sequence[StepTerm] = ()) -> TrainResult:
    """Train an adapter (the one `spec` configures, or a `plugins.Adapter` itself) with the CAT objective.
    The model is restored (adapter removed) on return unless keep_adapter.

    on_save(step, weights) runs at every `save_every` checkpoint (e.g. to write a loadable adapter file too);
    sampler: how batches are drawn (default: same-bucket batches weighted by repeats); own_folder: when
    cfg.checkpoint_dir belongs to another run, write to `<dir>_<run id>` (said in the result's warnings) instead of
    refusing (run_folder.FolderTaken); extra_terms: step terms an adapter's own trainer adds after the loss config's
    (e.g. flips of the training images)."""
    if not examples:
        raise ValueError("no training examples; the dataset is empty.")
    adapter = adapter_for(spec)
    module = denoiser.module
    base_param = next(module.parameters())
    device = torch.device(cfg.device) if cfg.device else base_param.device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    if amp == torch.float16 and device.type != "cuda":
        raise ValueError(f"mixed_precision 'fp16' needs a GPU (it trains with a grad scaler); use 'bf16' or 'no' on {device}.")
    data_dtype = torch.float32  # latents, noise and targets stay fp32; the forward casts to the compute dtype
    caption_rows.check_examples(examples, cfg)
    sampler = sampler or BatchSampler(examples, cfg.batch_size, (cfg.timestep_min, cfg.timestep_max))
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = load_checkpoint(resume) if resume else None
    settings = result_settings(cfg, loss_cfg, adapter, data_fingerprint(examples), _family_name(denoiser))
    if state is not None:
        check_resume(state, settings, cfg.steps, resume)
    notes = [n for n in [batch_note(examples, cfg)] if n]
    if ckpt_dir is not None:
        fix = "choose another checkpoint folder (the node's checkpoint_name) on a disk with room."
        writable_folder(ckpt_dir, "checkpoint folder", fix)
        same = state is not None and Path(resume).resolve().parent == ckpt_dir.resolve()
        ckpt_dir, moved = claim_or_own(ckpt_dir, settings, same, own_folder)
        if moved:
            log.warning(moved)
            notes.append(moved)

    was_training = module.training
    result = TrainResult(weights={}, warnings=notes)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # peft's init and dropout draw from the global RNG
        gen = torch.Generator().manual_seed(cfg.seed)  # every batch, timestep and noise (and inits that take it)
        adapter.install(denoiser, gen)
        terms: list[StepTerm] = []
        try:
            _set_checkpointing(denoiser, cfg.gradient_checkpointing)
            params = adapter.parameters()
            if ckpt_dir is not None:  # before step 1: a full disk found at the first save loses the steps before it
                check_space(ckpt_dir, checkpoint_bytes(params), "checkpoint folder",
                            "choose another checkpoint folder (the node's checkpoint_name).")
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
            scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
            # after install: hooks see the adapted layers
            terms = step_terms(loss_cfg, denoiser) + weight_terms(cfg, adapter) + list(extra_terms)
            for term in terms:
                term.start(examples)
            if state is not None:
                _restore(state, adapter, terms, opt, sched, gen, resume)
                result.history, result.steps_done = list(state["history"]), int(state["step"])
            module.train()

            def save(step: int) -> Path | None:
                if ckpt_dir is None:
                    return None
                snap = _snapshot(adapter, terms, opt, sched, gen, step, result.history, loss_cfg, cfg)
                snap["run_settings"] = settings
                result.last_checkpoint = _atomic_save(snap, checkpoint_path(ckpt_dir, step))
                return result.last_checkpoint

            t0 = time.perf_counter()
            for step in range(result.steps_done, cfg.steps):
                opt.zero_grad(set_to_none=True)
                fit = keep = total = 0.0
                for _ in range(cfg.grad_accum):
                    idx, t, noise = sampler.draw_batch(gen, denoiser.schedule)
                    pres = [examples[i].cond_pres for i in idx]
                    for term in terms:
                        pres = term.preservation(idx, pres, gen)
                    x0, c_tok, c_pres, w = _collate(examples, idx, device, data_dtype, pres)
                    t, noise = t.to(device), noise.to(device, data_dtype)
                    for term in terms:
                        term.see_batch([examples[i] for i in idx])
                        x0 = term.augment(x0, t, gen)
                    frozen = None
                    alpha, rows = preservation_rows(loss_cfg, step, len(idx), gen)
                    rows = None if rows is None else rows.to(device)
                    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                        if adapter.encodes_prompts:  # the conditionings change with the weights: encode them now
                            (c_tok, c_pres), frozen = adapter.conditionings([examples[i].prompts for i in idx], x0,
                                                                             alpha > 0)
                        lt = cat_objective(denoiser, x0, noise, t, c_tok, c_pres, alpha, w, terms, frozen,
                                           adapter.disabled, rows)
                    if not torch.isfinite(lt.loss):
                        raise TrainingDiverged(step + 1, save(step) if step > 0 else None)
                    for term in terms:
                        term.after_step(t, lt)
                    loss = lt.loss / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    total += float(lt.loss.detach()) / cfg.grad_accum
                    fit += float(lt.fit.mean()) / cfg.grad_accum
                    keep += float(lt.keep.mean()) / cfg.grad_accum
                if scaler:
                    scaler.unscale_(opt)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = opt.param_groups[0]["lr"]
                scaler.step(opt) if scaler else opt.step()
                if scaler:
                    scaler.update()
                sched.step()
                result.steps_done = step + 1
                for term in terms:
                    term.end_of_step(step + 1)
                result.history.append(dict(step=step + 1, loss=total, fit=fit, keep=keep, lr=lr))
                reports = {term.name: term.report() for term in terms}
                for term in terms:
                    result.history[-1].update({k: reports[term.name][k] for k in term.history_keys})
                if cfg.save_every and result.steps_done % cfg.save_every == 0:
                    save(result.steps_done)
                    if on_save:  # inside: the model holds what the file gets (the watch scores and previews it)
                        with contextlib.ExitStack() as exported:
                            for term in terms:
                                exported.enter_context(term.exporting())
                            on_save(result.steps_done, adapter.weights())
                if callback:
                    callback(StepInfo(step + 1, cfg.steps, total, fit, keep, lr, time.perf_counter() - t0,
                                      {k: r for k, r in reports.items() if r}))  # a term with nothing to show: no entry
        except TrainingDiverged:
            raise
        except BaseException as e:  # cancel (ComfyUI's interrupt, Ctrl-C) or a crash: keep what was learned
            if result.steps_done and (result.last_checkpoint is None or not result.last_checkpoint.name.endswith(f"{result.steps_done:06d}.pt")):
                with contextlib.suppress(Exception):
                    save(result.steps_done)
                    log.warning("training stopped at step %d; checkpoint saved to %s", result.steps_done, result.last_checkpoint)
            if _is_oom(e):
                raise TrainingOutOfMemory(
                    f"out of memory at step {result.steps_done + 1} (batch {cfg.batch_size}, latent {tuple(examples[0].latent.shape)}). "
                    "Lower batch_size (raise grad_accum to keep the effective batch), turn on gradient_checkpointing, "
                    f"use mixed_precision 'bf16', lower the resolution or {adapter.size_hint}.") from e
            raise
        finally:
            for term in terms:
                term.close()
            result.weights = adapter.weights()
            _set_checkpointing(denoiser, False)
            module.train(was_training)
            if not keep_adapter:
                adapter.remove()
    return result


def _family_name(denoiser: Denoiser) -> str | None:
    family = getattr(denoiser, "family", None)
    if family is None:
        from .. import families
        try:
            family = families.of(denoiser.module)
        except Exception:  # a network no family describes (tests' toys): nothing to compare
            return None
    return getattr(family, "name", None)


def batch_note(examples: Sequence[Example], cfg: TrainConfig) -> str | None:
    """Batches come from one bucket; one smaller than batch_size repeats its images inside every batch."""
    sizes: dict[tuple, int] = {}
    for ex in (ex for ex in examples if ex.drawn):
        sizes[tuple(ex.latent.shape)] = sizes.get(tuple(ex.latent.shape), 0) + 1
    largest = max(sizes.values())
    if cfg.batch_size <= largest:
        return None
    note = (f"batch_size {cfg.batch_size} is larger than the {'number of examples' if len(sizes) == 1 else 'largest bucket'} "
            f"({largest}): every batch repeats images, which costs memory and time and trains nothing more; lower "
            f"batch_size to {largest} or less (raise grad_accum for a larger effective batch).")
    log.warning(note)
    return note


def _set_checkpointing(denoiser: Denoiser, on: bool) -> None:
    hook = getattr(denoiser, "set_gradient_checkpointing", None)
    if hook is not None:
        hook(on)
    elif hasattr(denoiser.module, "gradient_checkpointing"):
        denoiser.module.gradient_checkpointing = on
    elif on:
        log.warning("this model offers no gradient checkpointing; training without it")


def _snapshot(adapter: Adapter, terms: Sequence[StepTerm], opt, sched, gen, step, history, loss_cfg, cfg) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "step": step, "history": list(history), "adapter": adapter.name,
        **adapter.state_dict(), **{term.name: term.state_dict() for term in terms},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "generator": gen.get_state(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loss": asdict(loss_cfg), "config": {k: v for k, v in asdict(cfg).items() if k != "device"},
    }


def _restore(state: dict, adapter: Adapter, terms: Sequence[StepTerm], opt, sched, gen, path) -> None:
    kind = state.get("adapter", adapter.name)  # files written before kinds were recorded hold the adapter's keys or fail there
    if kind != adapter.name:
        raise ValueError(f"checkpoint {path} was written by a {kind} run, this run trains {adapter.name}; "
                         f"resume it with the trainer that wrote it, or start afresh without a checkpoint.")
    adapter.load_state_dict(state, str(path))
    for term in terms:
        if term.name not in state:
            raise ValueError(f"checkpoint {path} was trained without {term.name!r}; resume with the same {term.name} settings.")
        term.load_state_dict(state[term.name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
