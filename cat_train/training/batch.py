"""One micro-batch: drawn by the sampler, shaped by the batch terms, evaluated by the objective.

The draws come from the run's generator in one fixed order (examples and caption rows, timesteps, noise, then
whatever the batch terms and cheaper preservation draw), so a resumed run draws exactly what the uninterrupted
one would have.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor

from ..data import captions as caption_rows
from ..step.conds import common_length
from ..step.denoiser import Cond, Denoiser, FlowSchedule, NoiseSchedule
from ..step.objective import LossTerms, cat_objective, preservation_rows
from ..step.plugs import Adapter, BatchTerm, LossTerm
from .config import CatLossConfig
from .examples import Example

DATA_DTYPE = torch.float32  # latents, noise and targets stay fp32; the forward casts to the compute dtype


class BatchSampler:
    """Draws same-shape (same bucket) batches, each example weighted by its repeats."""

    def __init__(self, examples: Sequence[Example], batch_size: int, timesteps: tuple[int, int | None] = (0, None)):
        self.examples, self.batch_size, self.timesteps = examples, batch_size, timesteps
        groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(examples):
            if ex.drawn:  # caption rows come only through their image's CaptionChoice
                groups.setdefault(tuple(ex.latent.shape), []).append(i)
        self.groups = list(groups.values())
        self.group_weights = torch.tensor([sum(examples[i].repeats for i in g) for g in self.groups],
                                          dtype=torch.float64)

    def draw(self, gen: torch.Generator) -> list[int]:
        group = self.groups[int(torch.multinomial(self.group_weights, 1, generator=gen))]
        w = torch.tensor([self.examples[i].repeats for i in group], dtype=torch.float64)
        picks = torch.multinomial(w, self.batch_size, replacement=len(group) < self.batch_size, generator=gen)
        return [group[int(i)] for i in picks]

    def draw_batch(self, gen: torch.Generator,
                   schedule: NoiseSchedule | FlowSchedule) -> tuple[list[int], Tensor, Tensor]:
        """Examples (each image's caption row where it has a choice), timesteps in the range and noise of one batch (on
        the CPU), in the order this sampler draws them."""
        idx = caption_rows.pick_rows(self.examples, self.draw(gen), gen)
        t = schedule.sample_t(len(idx), gen, *self.timesteps)
        return idx, t, torch.randn((len(idx), *self.examples[idx[0]].latent.shape), generator=gen)


def collate(examples: Sequence[Example], idx: list[int], device: torch.device, dtype: torch.dtype,
            pres: list[Cond] | None = None):
    batch = [examples[i] for i in idx]
    stack = lambda conds: {k: torch.stack([c[k] for c in common_length(conds, 0)]).to(device, dtype) for k in conds[0]}
    return (torch.stack([b.latent for b in batch]).to(device, dtype), stack([b.cond_token for b in batch]),
            stack(pres or [b.cond_pres for b in batch]), torch.tensor([b.weight for b in batch], device=device))


def micro_batch(denoiser: Denoiser, adapter: Adapter, examples: Sequence[Example], loss_cfg: CatLossConfig,
                sampler: BatchSampler, gen: torch.Generator, step: int, device: torch.device, amp: torch.dtype | None,
                batch_terms: Sequence[BatchTerm], loss_terms: Sequence[LossTerm]) -> tuple[Tensor, LossTerms]:
    """Draw one micro-batch at 0-based optimizer step `step`, let the batch terms shape it and evaluate the objective
    on it: (its timesteps, the objective's terms). The caller checks the loss and runs backward."""
    idx, t, noise = sampler.draw_batch(gen, denoiser.schedule)
    pres = [examples[i].cond_pres for i in idx]
    for term in batch_terms:
        pres = term.preservation(idx, pres, gen)
    x0, c_tok, c_pres, w = collate(examples, idx, device, DATA_DTYPE, pres)
    t, noise = t.to(device), noise.to(device, DATA_DTYPE)
    for term in batch_terms:
        term.see_batch([examples[i] for i in idx])
        x0 = term.augment(x0, t, gen)
    frozen = None
    alpha, rows = preservation_rows(loss_cfg, step, len(idx), gen)
    rows = None if rows is None else rows.to(device)
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        if adapter.encodes_prompts:  # the conditionings change with the weights: encode them now
            (c_tok, c_pres), frozen = adapter.conditionings([examples[i].prompts for i in idx], x0, alpha > 0)
        return t, cat_objective(denoiser, adapter.disabled, x0, noise, t, c_tok, c_pres, alpha, w, loss_terms, frozen,
                                rows)
