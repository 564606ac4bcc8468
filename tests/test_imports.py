"""The method's module graph: no cycle (lazy and type-only imports count too), each part imports only the parts below
it (docs/architecture.md), the objective knows no plug-in, the loop names no term and no adapter kind."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cat_train"

# What each part of cat_train may import (besides itself): docs/architecture.md draws this, each package's docstring
# says it. `(root)` is cat_train/__init__.py (the version).
MAY_IMPORT = {
    "options": set(),
    "step": set(),
    "families": set(),
    "data": set(),
    "adapters": {"step", "families", "options", "(root)"},
    "measure": {"step", "adapters", "data"},
    "terms": {"step", "families", "measure"},
    "training": {"step", "families", "adapters", "data", "measure", "terms", "options"},
    "queue": {"measure"},
    "world": {"step", "families", "adapters", "data", "measure", "terms", "training", "options"},
    "__main__": {"training"},
}


def module_graph() -> dict[str, set[str]]:
    """{module: modules of cat_train it imports}, from every relative import anywhere in its source."""
    graph = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        mod = ".".join(parts[:-1] if f.name == "__init__.py" else parts)
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" for a in node.names} if node.module is None else {base}
        graph[mod] = deps
    return {m: {d for d in ds if d in graph and d != m} for m, ds in graph.items()}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_graph_is_read_and_has_no_cycle():
    graph = module_graph()
    assert {"cat_train.training.loop", "cat_train.step.objective", "cat_train.terms.apt",
            "cat_train.adapters.catversion"} <= set(graph)
    assert "cat_train.training.batch" in graph["cat_train.training.loop"]  # the reader sees imports at all
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # and the check sees a cycle
    assert cycles(graph) == []


def test_each_part_imports_only_the_parts_below_it():
    graph = module_graph()
    assert set(MAY_IMPORT) | {"(root)"} >= {part(m) for m in graph}, "a new part: say what it may import"
    wrong = sorted(f"{m} -> {d}" for m, ds in graph.items() for d in ds
                   if part(d) != part(m) and part(d) not in MAY_IMPORT.get(part(m), set()))
    assert wrong == []
    parts = {p: {q for q in MAY_IMPORT[p]} for p in MAY_IMPORT}
    assert cycles({p: qs & set(parts) for p, qs in parts.items()}) == []  # the parts themselves are layered


def test_every_package_says_what_it_is_and_what_it_may_import():
    for init in sorted(PKG.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc and re.search(r"\bimport", doc, re.IGNORECASE), (f"{init.relative_to(ROOT)} must say what it may "
                                                                    "import")


def test_the_objective_imports_no_plug_in_and_plug_ins_import_downwards():
    graph = module_graph()
    assert {part(d) for d in graph["cat_train.step.objective"]} <= {"step"}
    assert graph["cat_train.step.plugs"] <= {"cat_train.step.denoiser"}  # the protocol is a leaf under all of them
    assert graph["cat_train.terms.apt_config"] <= {"cat_train.families", "cat_train.terms.apt"}  # layers: family facts
    assert not {d for m, ds in graph.items() if part(m) == "families" for d in ds if part(d) != "families"}


def test_the_loop_names_no_term_and_no_adapter_kind():
    kinds = r"\bapt|lora|catversion|kvembedding"  # \b: "adapter" is fine
    for name in ("loop.py", "batch.py", "checkpoints.py", "examples.py"):
        src = (PKG / "training" / name).read_text()
        # an Example carries its image's mask and probe prompts, data the loop hands on without knowing who reads them
        terms = "" if name == "examples.py" else r"|auto_?preserv|probe|\bema\b|min_snr|mask"
        assert not re.findall(kinds + terms, src, re.IGNORECASE), name
