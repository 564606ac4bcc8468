"""CPU threads for our own entry points, chosen for the work (`python -m cat_train ...`; never in ComfyUI's process).

The rule, measured by benchmarks/threads.py on a 2-core CPU (docs/benchmarks.md, "CPU threads"):
- A small model (the world's 1.7M-parameter UNet, the tests' tiny ones) runs on ONE thread: its ops take
  microseconds, so a second thread never paid (CAT steps/s on 2 threads: 0.89x of 1 thread on the quiet machine,
  0.13x beside a CPU hog; with OMP_WAIT_POLICY=PASSIVE 0.34x and 0.57x).
- A larger model runs on the cores the 1-minute load average leaves free (at least 1): the world's UNet 4x wider
  (26M) ran 1.19x faster on 2 threads than on 1 on the quiet machine; beside a hog the load leaves 1 core.
- OMP_WAIT_POLICY is left to OpenMP: PASSIVE (idle workers sleep) was slower than OpenMP's default in every
  measured row where the rule runs more than one thread (26M, quiet: 0.69x of 1 thread against 1.19x). It only
  softens a load that arrives after the choice (26M beside a hog on 2 threads: 0.61x with it, 0.16x without);
  who expects that sets OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1 themselves.
- An explicit OMP_NUM_THREADS, MKL_NUM_THREADS or OMP_WAIT_POLICY from the user always wins.
The count goes into the environment before torch is imported (OpenMP reads it once, at start), so subprocesses a
command starts inherit the same choice.
"""
from __future__ import annotations

import os
import sys

# Below this many parameters of the trained model, one thread; at or above it, the free cores. Measured on both
# sides (benchmarks/threads.py): 1.7M is fastest on 1 thread, 26M on 2; between them nothing was measured.
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
    """Call before `import torch`. Sets OMP_NUM_THREADS unless the user set it (or MKL_NUM_THREADS); returns the
    count chosen, or None where the user's setting stands."""
    if "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ:  # torch follows either
        return None
    n = threads_for(model_params)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:  # imported already (a caller that is not an entry point): the count still applies
        import torch

        torch.set_num_threads(n)
    return n
