"""The runs of a sweep: every combination of the --sweep values on top of the --set ones, each run's graph with
file names of its own, and the key --resume matches it by. Nothing is posted here."""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
import re
from dataclasses import dataclass, field
from typing import Iterator

from .errors import QueueError
from .workflow import apply_overrides, check_graph_values, override_value, resolve_node

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
        dup = sorted(v for v, n in Counter(values).items() if n > 1)  # not values.count: 10^4 values took 3 s
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
    last_server: object = None     # the Server of its last post, kept after `server` is cleared
    t_history_error: float | None = None  # since when its /history answers 5xx (None: it answers)
    warnings: list = field(default_factory=list)  # what its server warned of as it was queued (cat.warning)


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


def _base(graph: dict, sets: list, sweeps: list, object_info: dict) -> tuple[dict, list[str]]:
    """The graph with the --set values and its own values checked (check_graph_values), and the notes on them."""
    fixed = [(node, name, v[0]) for node, name, v in sets]
    base = apply_overrides(graph, fixed, object_info)
    swept = {(resolve_node(graph, node), name) for node, name, _ in sweeps}
    return check_graph_values(base, object_info, skip=swept)


def check_plan(graph: dict, sets: list, sweeps: list, object_info: dict, max_runs: int = DEFAULT_MAX_RUNS) -> list[str]:
    """Every check plan_runs makes, at the cost of one check per swept value instead of one run per combination
    (a value is right or wrong whatever the others are), so a grid of 10^6 runs is checked in moments. Returns the
    notes on the graph's values."""
    check_run_count(sweeps, max_runs)
    base, notes = _base(graph, sets, sweeps, object_info)
    for node, name, values in sweeps:
        for text in values:
            override_value(base, node, name, text, object_info)
    return notes


def iter_runs(graph: dict, sets: list, sweeps: list, object_info: dict, unique_names: bool = True) -> Iterator[Run]:
    """The runs of plan_runs one at a time, each built when asked for: a dry run of a large grid prints its first
    runs at once instead of building them all first."""
    base, _ = _base(graph, sets, sweeps, object_info)
    overridden = {(resolve_node(graph, node), name) for node, name, _ in sets + sweeps}
    combos = itertools.product(*[[(node, name, x) for x in v] for node, name, v in sweeps]) if sweeps else [()]
    seen = {}
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
        yield Run(i, label, g, key)


def plan_runs(graph: dict, sets: list, sweeps: list, object_info: dict, unique_names: bool = True,
              max_runs: int = DEFAULT_MAX_RUNS) -> list[Run]:
    """Every combination of the sweeps as a Run, its values typed and checked against object_info (the graph's own
    values too: check_graph_values) and (with unique_names) its file names suffixed with its swept values; nothing
    is posted here."""
    check_run_count(sweeps, max_runs)
    return list(iter_runs(graph, sets, sweeps, object_info, unique_names))
