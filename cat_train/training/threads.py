"""CPU threads for our own entry points on a machine other processes also use.

PyTorch's OpenMP workers spin while they wait for work. On an idle machine that saves microseconds per
op; beside another CPU-heavy process the spinning threads steal the cores the real work needs, and a
run slows 10-15x instead of in proportion to the load. So, before torch is imported, idle workers are
told to sleep (OMP_WAIT_POLICY=PASSIVE), and the thread count is the cores the load average leaves free.
An explicit OMP_NUM_THREADS / OMP_WAIT_POLICY from the user always wins.
"""
from __future__ import annotations

import os
import sys


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


def configure_cpu_threads() -> int | None:
    """Call before `import torch` (environment) and again after it (thread count). Returns the count set."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" in os.environ or "torch" not in sys.modules:
        return None
    import torch

    n = free_cores()
    torch.set_num_threads(n)
    return n
