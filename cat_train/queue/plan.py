"""The runs of a sweep: every combination of the --sweep values on top of the --set ones, each run's graph with
file names of its own, and the key --resume matches it by. Nothing is posted here."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass

from .errors import QueueError
from .workflow import apply_overrides, resolve_node

DEFAULT_MAX_RUNS = 64
# the inputs that name files: a sweep appends the run's swept values to each of them
NAME_INPUTS = {"CAT_SaveLora": "name", "CAT_LoraTrainer": "checkpoint_name", "SaveImage": "filename_prefix",
               "CAT_SaveCatVersion": "name"}


def parse_assign(text: str, sweep: bool) -> tuple[str, str, list[str]]:
    """'NODE.input=a,b' -> (NODE, input, ['a', 'b']): the texts as typed; typed against /object_info later."""
    target, eq, value = text.partition("=")
    node, dot, name = target.rpartition(".")
    if not eq or not dot or not node or not name:
        raise QueueError(f"override {text!r} must look like NODE.input=value (NODE: a node id or a node type).")
    values = value.split(",") if sweep else [value]
    if sweep:
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise QueueError(f"--sweep {target}: the value(s) {', '.join(map(repr, dup))} occur more than once; "
                             "each value is one run.")
    return node, name, values


@dataclass
class Run:
    index: int                 # 1-based, in sweep order
    label: dict                # "NODE.input" -> value, the swept values of this run
    graph: dict
    key: str                   # hash of the graph as posted: what --resume matches
    state: str = "todo"        # todo | active | done
    server: object = None  # the dispatch.Server running it; untyped here, since dispatch builds on plan, not back
    prompt_id: str = ""
    attempts: int = 0
    where: str | None = None   # running / pending, from the server's last /queue
    t_posted: float = 0.0
    t_progress: float = 0.0
    unknown: int = 0
    record: dict | None = None


def name_part(text: str) -> str:
    """A swept value as a piece of a file name: [A-Za-z0-9.+-] only, long values shortened with a hash."""
    s = re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "x"
    return s if len(s) <= 24 else f"{s[:16]}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def with_suffix(name: str, suffix: str) -> str:
    stem, ext = (name[: -len(".safetensors")], ".safetensors") if name.endswith(".safetensors") else (name, "")
    return f"{stem}_{suffix}{ext}"


def run_suffix(combo: list[tuple[str, str, str]]) -> str:
    """'cat_factor0.5_rank8' from the swept (node id, input, text); the node id joins in where two sweeps
    share an input name."""
    names = [name for _, name, _ in combo]
    return "_".join((f"{nid}-{name}" if names.count(name) > 1 else name) + name_part(text) for nid, name, text in combo)


def check_run_count(sweeps: list, max_runs: int) -> int:
    n = math.prod(len(v) for _, _, v in sweeps)
    if n > max_runs:
        sizes = " x ".join(str(len(v)) for _, _, v in sweeps)
        raise QueueError(f"the sweep makes {n} runs ({sizes} values), more than --max-runs {max_runs}; "
                         f"sweep fewer values, or pass --max-runs {n} if you mean it.")
    return n


def plan_runs(graph: dict, sets: list, sweeps: list, object_info: dict, unique_names: bool = True,
              max_runs: int = DEFAULT_MAX_RUNS) -> list[Run]:
    """Every combination of the sweeps as a Run, its values typed and checked against object_info and (with
    unique_names) its file names suffixed with its swept values; nothing is posted here."""
    check_run_count(sweeps, max_runs)
    fixed = [(node, name, v[0]) for node, name, v in sets]
    base = apply_overrides(graph, fixed, object_info)
    overridden = {(resolve_node(graph, node), name) for node, name, _ in sets + sweeps}
    combos = itertools.product(*[[(node, name, x) for x in v] for node, name, v in sweeps]) if sweeps else [()]
    out, seen = [], {}
    for i, combo in enumerate(combos, 1):
        g = apply_overrides(base, list(combo), object_info)
        label = {f"{node}.{name}": g[resolve_node(g, node)]["inputs"][name] for node, name, _ in combo}
        if combo and unique_names:
            suffix = run_suffix([(resolve_node(g, node), name, text) for node, name, text in combo])
            for nid, node in g.items():
                name = NAME_INPUTS.get(node["class_type"])
                value = node["inputs"].get(name)
                if name and isinstance(value, str) and (nid, name) not in overridden:
                    node["inputs"][name] = with_suffix(value, suffix)
            names = tuple(sorted((nid, str(node["inputs"].get(NAME_INPUTS.get(node["class_type"], ""))))
                                 for nid, node in g.items() if node["class_type"] in NAME_INPUTS))
            if names and names in seen:  # two values that read alike in a file name ("a b" and "a-b")
                for nid, node in g.items():
                    name = NAME_INPUTS.get(node["class_type"])
                    if name and isinstance(node["inputs"].get(name), str) and (nid, name) not in overridden:
                        node["inputs"][name] = with_suffix(node["inputs"][name], f"run{i}")
            seen[names] = i
        key = hashlib.sha1(json.dumps(g, sort_keys=True).encode()).hexdigest()[:16]
        out.append(Run(i, label, g, key))
    return out
