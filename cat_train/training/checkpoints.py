"""A run's checkpoints: what one holds, writing it atomically, and reading it back as exactly what was written.

A checkpoint is the adapter's entries, every step term's state under its name, the optimizer, the scheduler, the
run's generator and the global RNG (so a resumed run draws what the uninterrupted one would have), the history and
the settings. Tensors and plain data only: torch's safe loader reads them all.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from ..step.plugs import Adapter, RunHook, Term
from .run_folder import atomic_save

CHECKPOINT_FORMAT = "cat_train.checkpoint/1"


def save(obj, path: Path) -> Path:
    return atomic_save(obj, path, "free space on that disk or point checkpoint_dir (the node's checkpoint_name) "
                                  "elsewhere.")


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
                 "a dict without the trainer's 'format' key" if "format" not in state else
                 f"format {state['format']!r}")
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


def snapshot(adapter: Adapter, terms: Sequence[Term], opt, sched, gen, step, history, loss_cfg, cfg) -> dict:
    """Every term has an entry (a term without state an empty one): a resume refuses a checkpoint without one of
    its terms, as it was trained without it."""
    return {
        "format": CHECKPOINT_FORMAT, "step": step, "history": list(history), "adapter": adapter.name,
        **adapter.state_dict(), **{t.name: t.state_dict() if isinstance(t, RunHook) else {} for t in terms},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "generator": gen.get_state(), "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loss": asdict(loss_cfg), "config": {k: v for k, v in asdict(cfg).items() if k != "device"},
    }


def restore(state: dict, adapter: Adapter, terms: Sequence[Term], opt, sched, gen, path) -> None:
    # files written before kinds were recorded hold the adapter's keys or fail there
    kind = state.get("adapter", adapter.name)
    if kind != adapter.name:
        raise ValueError(f"checkpoint {path} was written by a {kind} run, this run trains {adapter.name}; "
                         f"resume it with the trainer that wrote it, or start afresh without a checkpoint.")
    adapter.load_state_dict(state, str(path))
    for term in terms:
        if term.name not in state:
            raise ValueError(f"checkpoint {path} was trained without {term.name!r}; resume with the same {term.name} "
                             "settings.")
        if isinstance(term, RunHook):
            term.load_state_dict(state[term.name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
