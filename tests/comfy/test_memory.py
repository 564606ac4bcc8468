"""Peak memory of training a bf16 SD1.5-shape UNet: far below what the old in-place fp32 copy added, and
within the budget the trainer prints (benchmarks/memory.py, run in its own process so its peak is its own)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bf16_training_memory_growth_vs_fp32_conversion_and_budget():
    # A real-size model: the subprocess takes the free cores by the pack's thread rule (OMP_NUM_THREADS, where set,
    # stands). It took 561-669 s on one thread alone and passed 900 s under load: the limit bounds a hung run only.
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--json", "--measure", "sd15",
                        "--res", "128", "--steps", "2", "--checkpointing", "off"], capture_output=True, text=True,
                       timeout=2400)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(line[7:])
    assert r["compute"] == "torch.bfloat16" and r["weights"] == 2 * 859_520_964  # bf16 weights, never converted
    # the old path converted the UNet to fp32 in place: +2 bytes a parameter before training even started
    assert r["growth"] < 0.35 * r["fp32_conversion"], r
    # the budget printed before step 1 holds (a little slack for the allocator's own pages)
    assert r["growth"] < 1.3 * r["predicted"] + 64 * 2**20, r
