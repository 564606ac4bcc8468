"""CPU threads for our own entry points, chosen for the work (`python -m cat_train ...`; never in ComfyUI's process).

The rule, measured by benchmarks/threads.py (docs/benchmarks.md, "CPU threads"):
- A small model (the world's 1.7M-parameter UNet, the tests' tiny ones) runs on ONE thread. Its ops take
  microseconds, so a second thread's hand-off costs more than it saves: on a quiet 2-core machine the demo's
  steps ran 3x slower on 2 threads than on 1 (issue 33), and beside a CPU-heavy process 1 thread is as fast.
- A real-size model runs on the cores the 1-minute load average leaves free (at least 1).
- OMP_WAIT_POLICY=PASSIVE only where more than one thread runs: then idle workers sleep instead of spinning,
  which beside another CPU-heavy process kept a run from slowing 10-15x; with one thread there are no workers.
- An explicit OMP_NUM_THREADS / OMP_WAIT_POLICY from the user always wins.
Both go into the environment before torch is imported (OpenMP reads them once, at start), so subprocesses a
command starts inherit the same choice.
"""
from __future__ import annotations

import os
import sys

# Below this many parameters of the trained model, one thread (the world's UNet, 1.7M, and the tests' tiny ones);
# at or above it, the free cores (SD-sized UNets, 860M+). benchmarks/threads.py measures the world model and the
# same UNet 4x wider (26M) on both sides of the line (docs/benchmarks.md).
SMALL_MODEL_PARAMS = 20_000_000


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_cores(load: float | None = None, cores: int | None = None) -> int:
    """Cores the 1-minute load average leaves idle (at least 1)."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def threads_for(model_params: int | None, free: int | None = None) -> int:
    """The thread count for training a model of `model_params` parameters (None: unknown, taken as real-size)."""
    if model_params is not None and model_params < SMALL_MODEL_PARAMS:
        return 1
    return free_cores() if free is None else free


def configure_cpu_threads(model_params: int | None = None) -> int | None:
    """Call before `import torch`. Sets OMP_NUM_THREADS (and OMP_WAIT_POLICY where more than one thread runs)
    unless the user set them; returns the count chosen, or None where the user's OMP_NUM_THREADS stands."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    n = threads_for(model_params)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if n > 1:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:  # imported already (a caller that is not an entry point): the count still applies
        import torch

        torch.set_num_threads(n)
    return n
