"""The plug points of a CAT training step: what is trained (`Adapter`) and what else a run plugs in, by role.

A step term implements the roles it needs and nothing more:

    BatchTerm  shapes what the step trains on (the loop calls it): preservation prompts, the batch, augmentation
    LossTerm   shapes the loss (the objective calls it): fit weights, penalties, what the forward passes record
    RunHook    hooks the run's lifecycle (the loop calls it): start, after each optimizer step, saves, state, end

APT is all three; min-SNR one small LossTerm; the EMA a RunHook; CatVersion's flips a BatchTerm. The loop
(`training.loop`) and the objective (`step.objective`) call only these hooks, so a new adapter kind or term is a
class, never a branch in the loop. A term's settings, and how to build it, are its config class in the registry
(`terms.registry`).

The rule for a new hook: it needs two users. A hook with one user is that user's branch in the loop under another
name; the hooks here each serve two terms, except five that are the only way their term sees what it needs
(`preservation`: auto preservation's prompt turns; `element_weight`: masks; `after_objective`: APT's indicator;
`exporting`: the EMA's weights in mid-run saves; `keep`: the layer-local keep estimator's CAT term,
terms/keep_local.py). `recording` serves APT's passes and the local keep estimator's recorded inputs. The shapes
follow peft's `LoraVariant` (static hooks of one role), ComfyUI's comfy/weight_adapter (a few members per kind),
kohya's `post_process_loss` and Hugging Face's `TrainerCallback` (the lifecycle).

This module is a leaf: it imports nothing from the method, so the objective, the loop and every plug-in can import
it without a cycle.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .denoiser import Denoiser


class Term:
    """Anything a run plugs into its step besides the adapter; `name` is its key in checkpoints, reports and the
    live view (one name per term of a run)."""

    name = ""


class BatchTerm(Term):
    """Shapes what one micro-batch trains on; the loop calls these in the terms' order, before the objective."""

    def preservation(self, idx: Sequence[int], conds: list[Any], gen: torch.Generator) -> list[Any]:
        """Each drawn sample's preservation conditioning y (unbatched; `idx`: the examples drawn), possibly replaced:
        a term may change which prompts the CAT term keeps as the run goes. Draws only from `gen`."""
        return conds

    def see_batch(self, examples: Sequence[Any]) -> None:
        """The batch's `Example`s, in batch order, before its own augment() (no draws here)."""

    def augment(self, x0: Tensor, t: Tensor, gen: torch.Generator) -> Tensor:
        """The batch's clean latents, possibly transformed; draws only from `gen` (resumes stay exact)."""
        return x0


class LossTerm(Term):
    """Shapes the loss without a forward pass of its own: it may ask for the frozen pass on y_T too, records what it
    needs while the frozen and the adapted passes run, and turns that into fit weights and penalties."""

    needs_frozen_token_pass = False  # the frozen pass also runs on y_T (its rows come first)
    estimates_keep = False  # gives the CAT term itself (keep()): the adapted pass then runs no y rows

    def fit_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weight of the fit term from the timesteps; None: 1."""
        return None

    def element_weight(self, pred_token: Tensor, frozen_token: Tensor | None) -> Tensor | None:
        """Per-element weight of the fit term, broadcast against the prediction (e.g. (B, 1, h, w)); the fit becomes
        its weighted mean; None: every element 1. Called once per evaluation, after both passes and before penalty(),
        with the batch's y_T predictions: adapted (with grad) and frozen (None unless the frozen y_T pass ran), which
        a term may keep for its penalty."""
        return None

    def recording(self, kind: str) -> ContextManager:
        """Entered around the frozen ("frozen") and the adapted ("adapted") forward."""
        return contextlib.nullcontext()

    def penalty(self, rows: int) -> Sequence[Tensor]:
        """Weighted scalars added to the loss, in order, from what the passes recorded (first `rows` samples: y_T)."""
        return ()

    def keep(self, rows: int, batch: int) -> Tensor:
        """For a term that `estimates_keep`: the CAT term's value per y row, with grad, from what it recorded in the
        frozen pass (`batch` rows, the y rows last). Called once per evaluation, after penalty()."""
        raise NotImplementedError

    def after_objective(self, t: Tensor, terms: NamedTuple) -> None:
        """After each evaluation of the objective whose loss is finite (each accumulated batch), before the next
        draw; `terms`: the objective's `LossTerms` (fit, keep, and fit_pre when the frozen y_T pass ran)."""


class RunHook(Term):
    """The run's lifecycle, and what a resume must restore (the shape of Hugging Face's TrainerCallback)."""

    history_keys: tuple[str, ...] = ()  # entries of report() that go into every history row

    def start(self, examples: Sequence[Any]) -> None:
        """Once, before the first step (and before a checkpoint's state is loaded): the run's `Example`s."""

    def end_of_step(self, step: int) -> None:
        """After optimizer step `step` (1-based), before that step's checkpoint, report and callback."""

    def exporting(self) -> ContextManager:
        """Entered around a mid-run save (`on_save` with the adapter's weights(), `save_every` files): a term that keeps
        other weights than the trained ones (the EMA) puts them in the parameters for the duration, then the trained
        ones back. The run's final weights are read after close(), which leaves what the term exports in place."""
        return contextlib.nullcontext()

    def report(self) -> dict:
        """What the live view and the history show of it."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Undo whatever the constructor attached to the model. Runs before the run's weights are read, so a term
        whose weights are exported instead of the trained ones (the EMA) puts them in the adapter here."""


class Adapter:
    """What the loop trains: LoRA in the UNet (adapters/lora.py), CatVersion in the text encoder (adapters/catversion/).

    install() puts it on the model, disabled() gives the frozen model for the frozen pass, remove() leaves the model
    as found. An adapter whose weights act in the text encoder sets `encodes_prompts`: the conditionings then change
    every step, so the loop asks `conditionings()` for them instead of using the examples' cached ones."""

    name = ""                 # checkpoint tag
    encodes_prompts = False
    size_hint = "the adapter's size"  # what to lower when a step runs out of memory

    def install(self, denoiser: "Denoiser", gen: torch.Generator) -> None:
        """Attach to the model; random initialisation draws from `gen` (the run's generator) or the global RNG."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def disabled(self) -> ContextManager:
        """Inside: the model computes as without the adapter (the frozen model)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Checkpoint entries (plain tensors and data; top-level keys of the checkpoint)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, where: str) -> None:
        """From a checkpoint's entries; a mismatch raises a ValueError naming `where` and the fix."""
        raise NotImplementedError

    def weights(self) -> Any:
        """What export writes (a copy or the trained modules, the kind decides)."""
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def layer_deltas(self) -> dict[str, Any]:
        """Its layers in the denoiser's network, by module path, for the layer-local keep estimator
        (terms/keep_local.py): each has `module` (its forward hook records the layer's input), `needs_base_out` and
        `energy(h, base_out)` (per row, the mean square of what the adapter adds to the layer's output on input h).
        Empty: an adapter with no layers there (CatVersion lives in the text encoder)."""
        return {}

    def conditionings(self, prompts: Iterable[tuple[str, str]], x0: Tensor, with_pres: bool):
        """For `encodes_prompts` adapters: ((y_T, y) adapted, (y_T, y) frozen) conditionings of a batch."""
        raise NotImplementedError
