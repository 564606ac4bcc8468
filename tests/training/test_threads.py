"""Our CLI's CPU thread settings: passive OpenMP waiting and as many threads as the load leaves cores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cat_train.training.threads import free_cores

ROOT = Path(__file__).resolve().parents[2]
PROBE = ("import os, cat_train.training.threads as t; t.configure_cpu_threads(); import torch; n = "
         "t.configure_cpu_threads(); print(os.environ.get('OMP_WAIT_POLICY'), n, torch.get_num_threads())")


def test_free_cores_follows_the_load():
    assert free_cores(load=0.0, cores=2) == 2
    assert free_cores(load=1.0, cores=2) == 1
    assert free_cores(load=7.3, cores=2) == 1   # never 0
    assert free_cores(load=1.4, cores=8) == 7   # rounds to the nearest core
    assert free_cores(load=0.0, cores=8) == 8


def _run(env):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_configure_before_and_after_torch():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    policy, n, torch_n = _run(env)
    assert policy == "PASSIVE" and n == torch_n and 1 <= int(n) <= (os.cpu_count() or 1)
    # an explicit choice by the user is kept
    policy, n, torch_n = _run({**env, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert policy == "ACTIVE" and n == "None" and torch_n == "1"
