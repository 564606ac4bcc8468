"""A run's checkpoint folder is its own, and a resume continues the run it says it continues.

Two runs queued with one `checkpoint_name` used to write the same `cat-stepNNNNNN.pt` names, so the second
overwrote the first and a later resume continued the wrong run. Now the folder records the run that owns it
(`cat-run.json`: a run id hashed from every setting that changes the weights, the data included); another run
is refused with the settings that differ and the fix. A resume compares the same settings with the ones the
checkpoint was written with. Storage is checked before step 1 (the folder can be created and written, free
space for a checkpoint), and a save that fails leaves no temp file behind.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import families
from ..options import recorded
from ..adapters.export import StorageError

RUN_FILE = "cat-run.json"


class FolderTaken(ValueError):
    """The checkpoint folder belongs to another run; `run_id` is this run's, `why` what differs."""

    def __init__(self, message: str, folder: Path, run_id: str, why: str):
        super().__init__(message)
        self.folder, self.run_id, self.why = folder, run_id, why


def _plain(value: Any) -> Any:
    """JSON-comparable form: tuples as lists, dataclasses as dicts, floats as repr (NaN equals NaN)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return repr(value)
    return value


SKETCH = 16        # random projections per role: any real change to the data moves them
DATA_TOLERANCE = 1e-4  # of the role's scale: GPU re-encodes (other conv/GEMM algorithms) move them far less


def data_fingerprint(examples: Sequence) -> dict:
    """What the run learns from, compared with a tolerance: a VAE or CLIP re-encode on a GPU after a restart may
    differ in the last bits, which must not make a resume "another dataset", while another image, caption, trigger
    or preservation prompt must. Per role (latents, y_T and y conditionings): a sum over examples of SKETCH seeded
    random projections of each tensor, weighted by the example's position (order counts), and its scale; exactly:
    the count, shapes, token weights, repeats and (adapters that encode prompts) the prompts."""
    exact = hashlib.sha256()
    sketch = {r: torch.zeros(SKETCH, dtype=torch.float64) for r in ("latent", "token", "pres")}
    scale = dict.fromkeys(sketch, 0.0)
    mats: dict[tuple[str, int], torch.Tensor] = {}
    seen: dict[int, tuple] = {}

    def project(key: str, t: torch.Tensor) -> tuple[torch.Tensor, float]:
        if id(t) not in seen:  # examples share latents and conditionings: project each tensor once
            v = t.detach().cpu().reshape(-1).double()
            if (key, v.numel()) not in mats:
                seed = zlib.crc32(f"{key}:{v.numel()}".encode())
                mats[(key, v.numel())] = torch.randn(v.numel(), SKETCH, generator=torch.Generator().manual_seed(seed),
                                                     dtype=torch.float64) / math.sqrt(v.numel())
            seen[id(t)] = (t, v @ mats[(key, v.numel())], float(v.norm()) / math.sqrt(max(1, v.numel())))
        return seen[id(t)][1], seen[id(t)][2]

    for i, ex in enumerate(examples):
        w = 1.5 + math.sin(1.618 * i)
        for role, tensors in (("latent", {"latent": ex.latent}), ("token", ex.cond_token or {}),
                              ("pres", ex.cond_pres or {})):
            for key in sorted(tensors):
                proj, norm = project(key, tensors[key])
                sketch[role] += w * proj
                scale[role] += w * norm
                exact.update(f"{role}:{key}:{tuple(tensors[key].shape)};".encode())
        exact.update(repr((float(ex.weight), int(ex.repeats), getattr(ex, "prompts", None))).encode())
        if getattr(ex, "mask", None) is not None:  # masks are read from files, not re-encoded: exact to 1e-4
            exact.update(b"mask:" + (ex.mask.detach().cpu().float() * 1e4).round().to(torch.int32).numpy().tobytes())
    return {"n": len(examples), "exact": exact.hexdigest()[:16],
            "sketch": {r: [float(x) for x in v] for r, v in sketch.items()}, "scale": scale}


def same_data(a, b) -> bool:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return a == b
    if a.get("n") != b.get("n") or a.get("exact") != b.get("exact"):
        return False
    for role, va in a.get("sketch", {}).items():
        vb = b.get("sketch", {}).get(role)
        tol = DATA_TOLERANCE * max(float(a["scale"][role]), float(b["scale"][role]), 1e-12)
        if vb is None or any(abs(float(x) - float(y)) > tol for x, y in zip(va, vb)):
            return False
    return True


def _coarse(data: dict) -> dict:
    """The data as the run id sees it: exact parts, sketches to 2 significant digits of their scale (a noisy
    re-encode keeps the id but for a rare rounding flip, which only gives the run a new folder)."""
    if not isinstance(data, dict):
        return data
    return {"n": data["n"], "exact": data["exact"],
            "sketch": {r: [round(float(x) / max(float(data["scale"][r]), 1e-12), 2) for x in v]
                       for r, v in data["sketch"].items()}}


def result_settings(cfg, loss_cfg, adapter, data: dict, family: str | None) -> dict:
    """Every setting that changes the trained weights, in a comparable form: each option as its field's "recorded"
    rule says (cat_train/options.py)."""
    spec = getattr(adapter, "spec", None)
    spec = recorded(spec) if is_dataclass(spec) else spec
    return {**_plain({"adapter": adapter.name, "spec": spec, "config": recorded(cfg), "loss": recorded(loss_cfg),
                      "family": family}), "data": data}


def run_id(settings: dict) -> str:
    ident = {**settings, "data": _coarse(settings.get("data"))}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'lr 0.0001 -> 0.0002' for each setting that differs (nested dicts by dotted name)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "(unset)"), new.get(k, "(unset)")
        if k == "data" and not prefix:
            if not same_data(a, b):
                out.append("the dataset (images, captions, triggers or preservation prompts differ)")
        elif isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            name = {"config.": "", "loss.": "loss "}.get(prefix, prefix) + k
            out.append(f"{name} {_show(a)} -> {_show(b)}")
    return out


def _show(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def claim(folder: Path, settings: dict, resuming_same_run: bool = False) -> str:
    """Record this run as the folder's owner, or refuse when another run owns it (its checkpoints would be
    overwritten and a later resume would continue a mix of both). Returns the run id."""
    rid = run_id(settings)
    record = folder / RUN_FILE
    if record.is_file():
        try:
            owner = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            owner = {}
        diff = differences(owner.get("settings", {}), settings) if "settings" in owner else ["unreadable record"]
        if diff:  # the same run (settings equal, data within tolerance) may use its folder again
            why = f"belongs to another run (run {owner.get('run_id')}); this run differs in {'; '.join(diff[:6])}"
            raise FolderTaken(
                f"checkpoint folder {folder} {why}. Its checkpoints would be overwritten: give this run its own "
                f"checkpoint_name (e.g. '{folder.name}_2'), resume from {folder.name}'s latest checkpoint with its "
                "settings, or delete the folder if that run is no longer wanted.", folder, rid, why)
        return owner.get("run_id", rid)  # the same run: keep the owner's record (its data as first encoded)
    if not resuming_same_run and any(folder.glob("cat-step*.pt")):
        why = "already holds checkpoints of an earlier run that recorded no settings"
        raise FolderTaken(
            f"checkpoint folder {folder} {why}; a new run would overwrite them. Give this run its own checkpoint_name "
            f"(e.g. '{folder.name}_2'), resume from that run's latest checkpoint, or delete the folder.", folder, rid,
                          why)
    tmp = folder / f".{RUN_FILE}.tmp{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"run_id": rid, "settings": settings}, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, record)
    finally:
        tmp.unlink(missing_ok=True)
    return rid


def claim_or_own(folder: Path, settings: dict, resuming_same_run: bool, own_folder: bool) -> tuple[Path, str | None]:
    """claim(), or with own_folder a taken folder's run goes to its own sibling `<folder>_<run id>` (the same settings
    find the same folder again, so a rerun or a resume lands beside its files). Returns (folder, note or None)."""
    try:
        claim(folder, settings, resuming_same_run)
        return folder, None
    except FolderTaken as e:
        if not own_folder:
            raise
        mine = folder.with_name(f"{folder.name}_{e.run_id}")
        writable_folder(mine, "checkpoint folder", "choose another checkpoint_name.")
        claim(mine, settings, resuming_same_run)
        return mine, (f"checkpoint folder {folder} {e.why}: this run's checkpoints go to {mine} instead, so neither "
                      "run overwrites the other; set checkpoint_name to choose the folder.")


def check_resume(state: dict, settings: dict, steps: int, path) -> None:
    """A resume continues the run the checkpoint was written by: refuse other settings, naming each, and a
    step count below the checkpoint's."""
    saved_step = int(state.get("step", 0))
    if steps < saved_step:
        raise ValueError(f"checkpoint {path} is at step {saved_step} but steps is {steps}; set steps to more than "
                         f"{saved_step} to train on, or resume from an earlier checkpoint.")
    kind = state.get("adapter", settings["adapter"])
    if kind != settings["adapter"]:
        raise ValueError(f"checkpoint {path} was written by a {kind} run, this run trains {settings['adapter']}; "
                         "resume it with the trainer that wrote it, or start afresh without a checkpoint.")
    saved = state.get("run_settings")
    if saved is not None and saved.get("family") != settings.get("family"):
        was, now = (families.title(f) for f in (saved.get("family"), settings.get("family")))
        raise ValueError(f"checkpoint {path} was trained on an {was} model, this model is {now}; resume it on the "
                         f"{was} model it was trained on, or start afresh without resume_from.")
    if saved is None:  # written before runs recorded their settings: compare what the file holds
        saved = {"config": _plain({k: v for k, v in (state.get("config") or {}).items()
                                   if k in settings["config"]}),
                 "loss": _plain(state.get("loss")) if "loss" in state else settings["loss"]}
        now = {"config": {k: v for k, v in settings["config"].items() if k in saved["config"]},
               "loss": settings["loss"]}
    else:
        now = settings
    diff = differences(saved, now)
    if diff:
        raise ValueError(f"checkpoint {path} was written by a run with other settings: {'; '.join(diff[:8])}. A resume "
                         "continues that run: set these back to the checkpoint's values, or start afresh without "
                         "resume_from (and with another checkpoint_name).")


def writable_folder(folder: Path, what: str, fix: str) -> None:
    """Create the folder and write a probe file in it (permissions do not tell all: read-only mounts, quotas)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".cat-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StorageError(e.errno, f"{what} {folder} cannot be written ({e.strerror or e}); {fix}") from None


STALE_TEMP_SECONDS = 600  # a temp file untouched this long is no save in progress: a save writes it without pause


def remove_stale_temps(folder: Path) -> list[Path]:
    """Temp files of saves killed mid-write (SIGKILL, power loss: `finally` never ran), e.g. a hidden
    `.cat-step000004.pt.tmp<pid>` per kill, each the size of a checkpoint. Removed when untouched for
    STALE_TEMP_SECONDS and (POSIX) their writer's pid is no live process, so another server's save in progress in a
    shared folder is left alone. Returns what was removed."""
    removed = []
    now = time.time()
    for tmp in folder.glob(".cat-*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        try:
            if not tmp.is_file() or now - tmp.stat().st_mtime < STALE_TEMP_SECONDS:
                continue
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # gone meanwhile, or not ours to remove: leave it
            continue
    return removed


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: age alone decides there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process
        return True
    return True


def drop_if_unused(folder: Path) -> bool:
    """A run folder holding only its `cat-run.json` (the run wrote nothing: save_every 0, or stopped before a save) is
    removed: a sweep left one per changed setting (104 of 130 folders). True when removed."""
    try:
        if {p.name for p in folder.iterdir()} != {RUN_FILE}:
            return False
        (folder / RUN_FILE).unlink()
        folder.rmdir()
    except OSError:  # written to meanwhile, or not removable: keep it
        return False
    return True


def check_space(folder: Path, need: int, what: str, fix: str) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no figure on this filesystem: the save itself reports
    if free < need:
        raise StorageError(errno.ENOSPC, f"{what} {folder} has {_mb(free)} free, but {_mb(need)} are needed; free some "
                                         f"space there or {fix}")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def checkpoint_bytes(params: Sequence[torch.Tensor]) -> int:
    """fp32 weights + AdamW's two moments, plus room for RNG state and history."""
    n = sum(p.numel() for p in params)
    return 3 * 4 * n + 2**20


def atomic_save(obj, path: Path, fix: str) -> Path:
    """torch.save to a temp file, then rename; a failure (full disk, torch's 'unexpected pos') removes the temp file
    (a 3 MB leftover per try would keep the disk full) and names the file and the fix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with_tmp = tmp.exists()
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and "unexpected pos" not in str(e) and "write" not in str(e).lower():
            raise
        code = getattr(e, "errno", None) or errno.EIO
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed (a full disk?)"
        raise StorageError(code, f"cannot write checkpoint {path}: {reason}; "
                                 f"{'the partial file was removed; ' if with_tmp else ''}{fix}") from e
    return path

