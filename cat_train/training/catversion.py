"""CatVersion's trainer: the one loop with a CatVersion adapter (adapters/catversion/), its reference sampler and flips.

Checkpoints, exact resume, cancel, accumulation, mixed precision and progress reports are the loop's, as for LoRA.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..adapters.catversion.adapter import CatVersionAdapter, Encode
from ..adapters.catversion.embeddings import KVEmbeddings
from ..adapters.catversion.spec import CatVersionSpec
from ..data.prompts import PreservationMode, preservation_prompt
from ..step.denoiser import Cond, Denoiser, FlowSchedule, NoiseSchedule
from ..terms.flip import Flip
from .batch import BatchSampler
from .config import CatLossConfig, TrainConfig
from .examples import Example
from .loop import StepInfo, train


@dataclass
class CatVersionConfig:
    steps: int = field(default=1000,
                       metadata={"help": "optimizer steps (the released adapters: 1000, adapter_gs-999)."})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (the paper: 1e-2 = 5e-3 base rate x batch "
                                                      "2, LDM's scale_lr)."})
    batch_size: int = field(default=2, metadata={"help": "images per step (the paper: 2)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (torch's default, as the "
                                                                "reference)."})
    alpha: float = field(default=0.0, metadata={"help": (
        "CAT factor: 0 = CatVersion as published; > 0 adds the CAT term, which keeps the preservation prompt's "
        "conditioning (UNet on y encoded without the embeddings vs with them).")})
    preservation: PreservationMode = field(default="class", metadata={"help": (
        "for a CAT factor > 0, how y is made from the caption: `class`, `strip` or `empty` (as CatLossConfig).")})
    class_word: str | dict[str, str] = field(default="", metadata={"help": (
        "for a CAT factor > 0 and `class`: y = the caption with the trigger replaced by this word (the node: the "
        "dataset's class word when empty).")})
    seed: int = field(default=0, metadata={"help": "seeds init, batches, timesteps and noise: same seed, same "
                                                   "embeddings (bit for bit on CPU)."})
    caption: Literal["class", "trigger"] = field(default="class", metadata={"help": (
        "training caption. `class`: the trigger replaced by the class word, no placeholder (the authors' code trains "
        "on the class word alone; a caption that is just the trigger becomes exactly that); `trigger`: the caption as "
        "given (this pack's earlier choice).")})
    flip: float = field(default=0.5, metadata={"help": (
        "probability of a horizontal flip of each training image (the authors' code: 0.5; earlier: 0).")})

    def __post_init__(self):
        for ok, msg in [(self.steps >= 1, f"steps must be >= 1, got {self.steps} (the paper: 1000)."),
                        (self.lr > 0, f"lr must be > 0, got {self.lr} (the paper: 1e-2)."),
                        (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
                        (self.alpha >= 0, f"CAT factor alpha must be >= 0 (0 = plain CatVersion), got {self.alpha}."),
                        (self.caption in ("class", "trigger"), "caption must be 'class' or 'trigger', got "
                                                               f"{self.caption!r}."),
                        (0 <= self.flip <= 1, f"flip (a probability) must be in [0, 1], got {self.flip}.")]:
            if not ok:
                raise ValueError(msg)


@dataclass
class CatVersionResult:
    embeddings: dict[str, KVEmbeddings]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps_done: int = 0
    last_checkpoint: Path | None = None


class ReferenceSampler(BatchSampler):
    """The CatVersion trainer's own draw, kept so a seed gives the embeddings it always gave: images uniformly
    (repeats come as repeated items), with aspect buckets a bucket by its image count first; noise before t."""

    def __init__(self, examples: Sequence[Example], batch_size: int):
        self.examples, self.batch_size = examples, batch_size
        shapes = sorted({tuple(e.latent.shape) for e in examples})
        self.groups = [[i for i, e in enumerate(examples) if tuple(e.latent.shape) == sh] for sh in shapes]
        self.sizes = torch.tensor([float(len(gr)) for gr in self.groups])

    def draw(self, gen: torch.Generator) -> list[int]:
        if len(self.groups) == 1:
            return torch.randint(0, len(self.examples), (self.batch_size,), generator=gen).tolist()
        grp = self.groups[int(torch.multinomial(self.sizes, 1, generator=gen))]
        return [grp[j] for j in torch.randint(0, len(grp), (self.batch_size,), generator=gen).tolist()]

    def draw_batch(self, gen: torch.Generator,
                   schedule: NoiseSchedule | FlowSchedule) -> tuple[list[int], Tensor, Tensor]:
        idx = self.draw(gen)
        noise = torch.randn((len(idx), *self.examples[idx[0]].latent.shape), generator=gen)
        return idx, schedule.sample_t(len(idx), gen), noise


def training_caption(caption: str, triggers: Sequence[str], cfg: "CatVersionConfig") -> str:
    """The caption CatVersion trains on: with `caption="class"` the trigger replaced by the class word."""
    if cfg.caption == "trigger" or not triggers:
        return caption
    if not cfg.class_word:
        raise ValueError("CatVersion caption='class' trains on the class word instead of the trigger, but no class "
                         "word is set: give class_word (the node: the dataset's class word, or its class_word widget), "
                         "or set caption='trigger'.")
    return preservation_prompt(caption, tuple(triggers), "class", cfg.class_word)


def train_catversion(denoiser: Denoiser, encoders: Mapping[str, nn.Module], encode: Encode,
                     items: Sequence[tuple[Tensor, str, Sequence[str]]], spec: CatVersionSpec, cfg: CatVersionConfig,
                     output_layers: Mapping[str, int | None] | None = None,
                     callback: Callable[[StepInfo], None] | None = None,
                     finish: Callable[[Cond, Tensor], Cond] | None = None, resume: str | Path | None = None,
                     **loop) -> CatVersionResult:
    """Train the embeddings of each encoder (SDXL: two) on (latent, caption y_T, triggers) items.

    `encode(prompts)` must run the text encoders as installed (it is called inside the install) and return
    the UNet's cond, differentiably; the UNet and the encoders are frozen, only the embeddings learn.
    `finish(cond, x0)` turns the encoder's batched output into the UNet's cond for those latents (SDXL: pooled
    output + size conditioning); None: `encode` returns it ready. `loop`: further `TrainConfig` settings
    (grad_accum, mixed_precision, save_every, checkpoint_dir, max_grad_norm, gradient_checkpointing); `resume`: a
    checkpoint of such a run. Same seed, same embeddings (bit for bit on CPU)."""
    ys = [preservation_prompt(cap, tuple(trig), cfg.preservation, cfg.class_word) if cfg.alpha > 0 else ""
          for _, cap, trig in items]
    examples = [Example(lat, {}, {}, prompts=(training_caption(cap, trig, cfg), y))
                for (lat, cap, trig), y in zip(items, ys)]
    loss_cfg = CatLossConfig(alpha=cfg.alpha, preservation=cfg.preservation, class_word=cfg.class_word)
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                       seed=cfg.seed, **loop)
    adapter = CatVersionAdapter(encoders, encode, spec, output_layers, finish)
    t0 = time.perf_counter()
    r = train(denoiser, examples, loss_cfg, adapter, tcfg, callback=callback, resume=resume,
              sampler=ReferenceSampler(examples, cfg.batch_size),
              extra_terms=[Flip(denoiser, cfg.flip)] if cfg.flip else [])
    return CatVersionResult(r.weights, r.history, time.perf_counter() - t0, r.steps_done, r.last_checkpoint)


def training_metadata(spec: CatVersionSpec, cfg: CatVersionConfig, triggers: Sequence[str] = (), base: str = "",
                      images: int = 0, steps_done: int | None = None) -> dict[str, str]:
    layers = spec.layers if isinstance(spec.layers, int) else list(spec.layers)
    return {"catversion_spec": json.dumps({**asdict(spec), "layers": layers}),
            "catversion_train": json.dumps({**asdict(cfg), "class_word": cfg.class_word}),
            "catversion_triggers": json.dumps(list(triggers)), "catversion_base": base,
            "catversion_images": str(images), "catversion_steps": str(cfg.steps if steps_done is None else steps_done),
            "cat_factor": str(float(cfg.alpha))}
