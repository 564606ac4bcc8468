"""The method's module graph: no cycle (lazy and type-only imports count too), the objective knows no plug-in, the
loop names no regularizer and no adapter kind."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cat_train"


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
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {f"{base}.{a.name}" for a in node.names} if node.module is None else {base}
        graph[mod] = deps
    return {m: {d for d in ds if d in graph and d != m} for m, ds in graph.items()}


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
    assert {"cat_train.training.loop", "cat_train.step.objective", "cat_train.terms.apt", "cat_train.adapters.catversion"} <= set(graph)
    assert "cat_train.step.objective" in graph["cat_train.training.loop"]  # the reader sees imports at all
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]  # and the check sees a cycle
    assert cycles(graph) == []


def test_the_objective_imports_no_plug_in_and_plug_ins_import_downwards():
    graph = module_graph()
    assert not graph["cat_train.step.objective"] & {"cat_train.terms.apt", "cat_train.terms.registry", "cat_train.training.loop",
                                          "cat_train.adapters.catversion", "cat_train.adapters.registry"}
    assert graph["cat_train.step.plugs"] <= {"cat_train.step.denoiser"}  # the protocol is a leaf under all of them
    assert graph["cat_train.terms.apt_config"] <= {"cat_train.families"}  # its default layers are family knowledge


def test_the_loop_names_no_regularizer_and_no_adapter_kind():
    src = (PKG / "training" / "loop.py").read_text()
    assert not re.findall(r"\bapt|lora|catversion|kvembedding", src, re.IGNORECASE)  # \b: "adapter" is fine
