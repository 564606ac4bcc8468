"""Issue 32, a newcomer's first hour in the docs: nodes/README.md names every module, no stale "not there yet" for
what the nodes have, and the README says how to install torch without CUDA on a machine without a GPU."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nodes_readme_names_every_module():
    text = (ROOT / "nodes" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "nodes").glob("*.py")) if p.name != "__init__.py"
               and f"`{p.name}`" not in text]
    assert missing == [], f"nodes/README.md lacks {missing}"


def test_world_bench_does_not_call_preservation_prompts_missing():
    text = (ROOT / "docs" / "world-bench.md").read_text(encoding="utf-8")
    assert "not there yet" not in text
    assert "`preservation_prompts`" in text  # the Loss Config input that holds them


def test_readme_gives_the_cpu_only_torch_index():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if "--index-url" in ln)
    assert "https://download.pytorch.org/whl/cpu" in line and "torch==2.14.1" in line, line
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "--index-url" not in ci  # CI keeps its local wheels
