"""--out: the journal of the finished runs, rewritten after each one, and what --resume takes from it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import QueueError
from .plan import Run


def check_out(path: Path, keep: bool = True) -> None:
    """--out before anything is posted: its folder is made when missing and a probe file written there and removed,
    so a folder that cannot take the journal is named before the first run trains, not after it (the journal and the
    table beside it are written by temporary file and rename, which needs the folder, not the file, writable).
    keep=False (a dry run) removes the folders it made."""
    if path.is_dir():
        raise QueueError(f"--out {path} is a folder; name the journal file in it, e.g. --out {path / 'runs.json'}.")
    made, parent = [], path.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("probe")
        os.remove(probe)
    except OSError as e:
        raise QueueError(f"--out {path}: cannot write in {path.parent} ({e.strerror or e}); nothing was posted: pass "
                         "--out in a folder you can write, or make this one writable.") from None
    finally:
        for d in made if not keep else ():
            try:
                d.rmdir()
            except OSError:
                pass


def write_journal(path: Path, records: list[dict]) -> None:
    """Atomic: a reader (or a sweep killed mid-write) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(records, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_journal(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as e:
        raise QueueError(f"--resume: {path} is not a journal this command wrote ({e}); move it away or drop "
                         "--resume.") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise QueueError(f"--resume: {path} is not a journal this command wrote (a JSON list of runs).")
    return data


def resume(runs: list[Run], journal: list[dict]) -> list[dict]:
    """Marks the runs the journal holds as finished, matched by the key of the graph as posted (so a run counts
    as done only when its every value is the same), numbered in this sweep's order. Returns the journal's
    finished runs of other settings: they stay in the journal as they were."""
    done = {rec.get("key"): rec for rec in journal if rec.get("ok")}
    for r in runs:
        if r.key in done:
            r.state, r.record = "done", {**done[r.key], "run": r.index}
    keys = {r.key for r in runs}
    return [rec for rec in journal if rec.get("ok") and rec.get("key") not in keys]
