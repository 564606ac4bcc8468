"""`python -m cat_train queue`: batch runs and sweeps of one API-format workflow through ComfyUI servers.

The command is `cli.main`; docs/batch.md describes it and lists what each module here holds. The four names
below are the ones docs/batch.md gives for use from Python, so they stay importable from the package itself.
It talks to ComfyUI servers over HTTP and may import measure (its chart); the method never imports it.
"""
from .dispatch import Sweep
from .plan import plan_runs
from .report import best_balanced, sweep_table

__all__ = ["Sweep", "best_balanced", "plan_runs", "sweep_table"]
