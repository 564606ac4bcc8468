"""Our CLI's CPU threads follow the work: one for the world's small model, the free cores for a real-size one,
OpenMP's own waiting policy (PASSIVE measured slower where the rule runs more threads), the user's own settings
first; all before torch loads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cat_train.training.threads import SMALL_MODEL_PARAMS, free_cores, threads_for

ROOT = Path(__file__).resolve().parents[2]
# the entry point's own call, then torch: what OpenMP was told, what torch runs with, and whether torch had
# loaded before the choice was made
ENTRY = """
import os, sys
import cat_train.__main__ as m
n = m.threads_before_torch({command!r})
loaded = 'torch' in sys.modules
import torch
print(n, os.environ.get('OMP_NUM_THREADS'), os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads(), loaded)
"""
# a real-size model on a machine with 2 free cores, whatever the load here is
BIG = """
import importlib.util, os, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location('t', Path('cat_train/training/threads.py'))
t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
t.free_cores = lambda: 2
n = t.configure_cpu_threads(10**9)
import torch
print(n, os.environ.get('OMP_NUM_THREADS'), os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())
"""


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    return {**env, **extra}


def _run(code, env):
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_free_cores_follows_the_load():
    assert free_cores(load=0.0, cores=2) == 2
    assert free_cores(load=1.0, cores=2) == 1
    assert free_cores(load=7.3, cores=2) == 1   # never 0
    assert free_cores(load=1.4, cores=8) == 7   # rounds to the nearest core
    assert free_cores(load=0.0, cores=8) == 8


def test_small_models_run_on_one_thread_real_size_ones_on_the_free_cores():
    assert threads_for(1_692_268, free=8) == 1
    assert threads_for(SMALL_MODEL_PARAMS - 1, free=8) == 1
    assert threads_for(SMALL_MODEL_PARAMS, free=8) == 8
    assert threads_for(859_520_964, free=2) == 2      # SD1.5's UNet
    assert threads_for(None, free=3) == 3             # unknown work: as a real-size one


def test_the_demo_chooses_one_thread_before_torch_loads():
    n, omp, policy, torch_n, loaded = _run(ENTRY.format(command="demo"), _clean_env())
    assert (n, omp, torch_n, loaded) == ("1", "1", "1", "False")
    assert policy == "None"


def test_a_real_size_model_gets_the_free_cores_and_openmps_own_waiting():
    n, omp, policy, torch_n = _run(BIG, _clean_env())
    assert (n, omp, policy, torch_n) == ("2", "2", "None", "2")


def test_the_users_own_settings_win():
    n, omp, policy, torch_n, loaded = _run(ENTRY.format(command="demo"),
                                           _clean_env(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE"))
    assert (n, omp, policy, torch_n, loaded) == ("None", "2", "ACTIVE", "2", "False")


def test_an_mkl_thread_count_of_the_users_stands_too():
    n, omp, policy, torch_n, loaded = _run(ENTRY.format(command="demo"), _clean_env(MKL_NUM_THREADS="2"))
    assert (n, omp, torch_n) == ("None", "None", "2")


def test_the_world_unet_size_the_rule_is_given_is_the_models():
    import cat_train.__main__ as m
    from cat_train.world.model import build

    assert sum(p.numel() for p in build()[0].parameters()) == m.WORLD_UNET_PARAMS < SMALL_MODEL_PARAMS
