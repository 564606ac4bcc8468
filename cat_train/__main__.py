"""`python -m cat_train demo|bench|queue|options-doc ...`: each subcommand lives in its own module.

`-m` finds the package from the repository root only; from any other folder run the package folder
itself: `python /path/to/ComfyUI-CAT/cat_train demo --out out/demo` (relative paths stay the caller's).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

if not __package__:  # `python path/to/cat_train ...` from any folder: make the package importable by name,
    # and take the package folder itself off the path, where cat_train/queue/ would shadow the stdlib's queue
    _here = Path(__file__).resolve().parent
    sys.path[:] = [str(_here.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _here]

COMMANDS = {
    "demo": ("cat_train.world.demo", "plain LoRA vs CAT on the embedded world model: image grid, PS/IS/KPS table, "
                                     "LoRAs, loss curve"),
    "bench": ("cat_train.world.benches", "knowledge-preservation benchmark ('bench kps [--quick]'; 'bench masked': "
                                         "masked training)"),
    "queue": ("cat_train.queue.cli", "post an API-format workflow to a running ComfyUI server, with overrides"),
    "options-doc": ("cat_train.options", "render every option's help into docs/options.md ('--check': compare only)"),
}

# Parameters of the model a command trains, for the thread rule (training/threads.py): the demo and the benches
# train the world's UNet (tests/training/test_threads.py checks the number against the model).
WORLD_UNET_PARAMS = 1_692_268
TRAINS = {"demo": WORLD_UNET_PARAMS, "bench": WORLD_UNET_PARAMS}


def threads_before_torch(command: str) -> int | None:
    """The thread rule for `command`, applied before torch loads: OpenMP reads its settings once, when torch's
    library loads, and importing cat_train.training would load torch first, so threads.py is loaded by its path."""
    spec = importlib.util.spec_from_file_location("_cat_threads", Path(__file__).resolve().parent / "training"
                                                  / "threads.py")
    threads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(threads)
    return threads.configure_cpu_threads(TRAINS.get(command))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m cat_train <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:11s} {doc}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}")
            return 2
        return 0
    threads_before_torch(argv[0])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
