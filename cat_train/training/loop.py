"""The CAT training loop: AdamW on the adapter only, checkpoints that resume bit-exactly, clean stops.

What is trained is a `plugs.Adapter` (built from a spec by `adapters.registry.adapter_for`, or passed in) and what
else the run plugs in are the terms its configuration switches on (`terms.registry`), each called through the roles
it implements (`plugs.BatchTerm`, `LossTerm`, `RunHook`): the loop names neither. One micro-batch is
`batch.micro_batch`; what a checkpoint holds is `checkpoints`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..adapters.registry import AdapterSpec, adapter_for
from ..data import captions as caption_rows
from ..step.denoiser import Denoiser
from ..step.plugs import Adapter, BatchTerm, LossTerm, RunHook, Term
from ..terms import registry
from .batch import BatchSampler, micro_batch
from .checkpoints import checkpoint_path, load_checkpoint, restore, snapshot
from .checkpoints import save as save_checkpoint
from .config import CatLossConfig, TrainConfig, check_run
from .examples import Example, batch_note
from .run_folder import check_resume, check_space, checkpoint_bytes, claim_or_own, data_fingerprint, result_settings
from .run_folder import drop_if_unused, remove_stale_temps, writable_folder

log = logging.getLogger("cat_train")


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
    first_step: int = 0  # steps done before this run (a resume's): elapsed counts only the steps after it


@dataclass
class TrainResult:
    weights: Any  # the adapter's `weights()`
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    last_checkpoint: Path | None = None
    warnings: list[str] = field(default_factory=list)  # also logged; for a host to show beside the summary


class TrainingDiverged(RuntimeError):
    def __init__(self, step: int, checkpoint: Path | None):
        where = f"the last good state is saved in {checkpoint}" if checkpoint else ("set checkpoint_dir to keep the "
                                                                                    "last good state")
        super().__init__(f"loss became NaN/inf at step {step}; training stopped before the bad update, {where}. "
                         "Lower the learning rate, use mixed_precision 'bf16' instead of 'fp16', or set max_grad_norm "
                         "(e.g. 1.0).")
        self.step, self.checkpoint = step, checkpoint


class TrainingOutOfMemory(RuntimeError):
    pass



def lr_factor(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "constant":
        return warm
    progress = max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _is_oom(e: BaseException) -> bool:
    return (isinstance(e, (torch.OutOfMemoryError, MemoryError))
            or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()))


def train(denoiser: Denoiser, examples: Sequence[Example], loss_cfg: CatLossConfig, spec: AdapterSpec | Adapter,
          cfg: TrainConfig, callback: Callable[[StepInfo], None] | None = None, resume: str | os.PathLike | None = None,
          keep_adapter: bool = False, on_save: Callable[[int, Any], None] | None = None,
          sampler: BatchSampler | None = None, own_folder: bool = False,
          extra_terms: Sequence[Term] = (), on_own_folder: Callable[[Path], None] | None = None) -> TrainResult:
    """Train an adapter (the one `spec` configures, or a `plugs.Adapter` itself) with the CAT objective.
    The model is restored (adapter removed) on return unless keep_adapter.

    on_save(step, weights) runs at every `save_every` checkpoint (e.g. to write a loadable adapter file too);
    sampler: how batches are drawn (default: same-bucket batches weighted by repeats); own_folder: when
    cfg.checkpoint_dir belongs to another run, write to `<dir>_<run id>` (said in the result's warnings) instead of
    refusing (run_folder.FolderTaken), and on_own_folder(that folder) is called before step 1 (a host names the run's
    other files after it: two runs with one checkpoint_name must not share a step file name); extra_terms: step
    terms an adapter's own trainer adds after the configured ones (e.g. flips of the training images)."""
    if not examples:
        raise ValueError("no training examples; the dataset is empty.")
    adapter = adapter_for(spec)
    module = denoiser.module
    base_param = next(module.parameters())
    device = torch.device(cfg.device) if cfg.device else base_param.device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    if amp == torch.float16 and device.type != "cuda":
        raise ValueError("mixed_precision 'fp16' needs a GPU (it trains with a grad scaler); use 'bf16' or 'no' on "
                         f"{device}.")
    caption_rows.check_examples(examples, cfg)
    together = check_run(cfg, loss_cfg, sum(1 for ex in examples if ex.drawn))
    for note in together:
        log.warning(note)
    sampler = sampler or BatchSampler(examples, cfg.batch_size, (cfg.timestep_min, cfg.timestep_max))
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = load_checkpoint(resume) if resume else None
    settings = result_settings(cfg, loss_cfg, adapter, data_fingerprint(examples), _family_name(denoiser))
    if state is not None:
        check_resume(state, settings, cfg.steps, resume)
    notes = together + [n for n in [batch_note(examples, cfg)] if n]
    if ckpt_dir is not None:
        fix = "choose another checkpoint folder (the node's checkpoint_name) on a disk with room."
        writable_folder(ckpt_dir, "checkpoint folder", fix)
        same = state is not None and Path(resume).resolve().parent == ckpt_dir.resolve()
        ckpt_dir, moved = claim_or_own(ckpt_dir, settings, same, own_folder)
        for tmp in remove_stale_temps(ckpt_dir):
            log.info("removed %s, left by a save that was killed mid-write", tmp)
        if moved:
            log.warning(moved)
            notes.append(moved)
            if on_own_folder:
                on_own_folder(ckpt_dir)

    was_training = module.training
    result = TrainResult(weights={}, warnings=notes)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # peft's init and dropout draw from the global RNG
        gen = torch.Generator().manual_seed(cfg.seed)  # every batch, timestep and noise (and inits that take it)
        adapter.install(denoiser, gen)
        hooks: list[RunHook] = []
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
            terms = registry.build(loss_cfg, cfg, denoiser, adapter) + list(extra_terms)
            batch_terms = [t for t in terms if isinstance(t, BatchTerm)]
            loss_terms = [t for t in terms if isinstance(t, LossTerm)]
            hooks = [t for t in terms if isinstance(t, RunHook)]
            for hook in hooks:
                hook.start(examples)
            if state is not None:
                restore(state, adapter, terms, opt, sched, gen, resume)
                result.history, result.steps_done = list(state["history"]), int(state["step"])
            module.train()

            def save(step: int) -> Path | None:
                if ckpt_dir is None:
                    return None
                snap = snapshot(adapter, terms, opt, sched, gen, step, result.history, loss_cfg, cfg)
                snap["run_settings"] = settings
                result.last_checkpoint = save_checkpoint(snap, checkpoint_path(ckpt_dir, step))
                return result.last_checkpoint

            t0, first_step = time.perf_counter(), result.steps_done
            for step in range(result.steps_done, cfg.steps):
                opt.zero_grad(set_to_none=True)
                fit = keep = total = 0.0
                for _ in range(cfg.grad_accum):
                    t, lt = micro_batch(denoiser, adapter, examples, loss_cfg, sampler, gen, step, device, amp,
                                        batch_terms, loss_terms)
                    if not torch.isfinite(lt.loss):
                        raise TrainingDiverged(step + 1, save(step) if step > 0 else None)
                    for term in loss_terms:
                        term.after_objective(t, lt)
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
                for hook in hooks:
                    hook.end_of_step(step + 1)
                result.history.append(dict(step=step + 1, loss=total, fit=fit, keep=keep, lr=lr))
                reports = {hook.name: hook.report() for hook in hooks}
                for hook in hooks:
                    result.history[-1].update({k: reports[hook.name][k] for k in hook.history_keys})
                if cfg.save_every and result.steps_done % cfg.save_every == 0:
                    save(result.steps_done)
                    if on_save:  # inside: the model holds what the file gets (the watch scores and previews it)
                        with contextlib.ExitStack() as exported:
                            for hook in hooks:
                                exported.enter_context(hook.exporting())
                            on_save(result.steps_done, adapter.weights())
                if callback:
                    callback(StepInfo(step + 1, cfg.steps, total, fit, keep, lr, time.perf_counter() - t0,
                                      {k: r for k, r in reports.items() if r},  # a term with nothing to show: no entry
                                      first_step))
        except TrainingDiverged:
            raise
        except BaseException as e:  # cancel (ComfyUI's interrupt, Ctrl-C) or a crash: keep what was learned
            saved = result.last_checkpoint is not None and result.last_checkpoint.name.endswith(
                f"{result.steps_done:06d}.pt")
            if result.steps_done and not saved:
                with contextlib.suppress(Exception):
                    save(result.steps_done)
                    log.warning("training stopped at step %d; checkpoint saved to %s", result.steps_done,
                                result.last_checkpoint)
            if result.last_checkpoint is not None:  # where to resume from, for a host to show beside its Cancel
                with contextlib.suppress(AttributeError, TypeError):
                    e.cat_checkpoint = result.last_checkpoint
            if _is_oom(e):
                raise TrainingOutOfMemory(
                    f"out of memory at step {result.steps_done + 1} (batch {cfg.batch_size}, latent "
                    f"{tuple(examples[0].latent.shape)}). Lower batch_size (raise grad_accum to keep the effective "
                    "batch), turn on gradient_checkpointing, use mixed_precision 'bf16', lower the resolution or "
                    f"{adapter.size_hint}.") from e
            raise
        finally:
            for hook in hooks:
                hook.close()
            result.weights = adapter.weights()
            _set_checkpointing(denoiser, False)
            module.train(was_training)
            if not keep_adapter:
                adapter.remove()
            if ckpt_dir is not None and drop_if_unused(ckpt_dir):
                log.info("removed the run folder %s: this run wrote nothing in it", ckpt_dir)
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


def _set_checkpointing(denoiser: Denoiser, on: bool) -> None:
    hook = getattr(denoiser, "set_gradient_checkpointing", None)
    if hook is not None:
        hook(on)
    elif hasattr(denoiser.module, "gradient_checkpointing"):
        denoiser.module.gradient_checkpointing = on
    elif on:
        log.warning("this model offers no gradient checkpointing; training without it")
