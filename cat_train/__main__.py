"""`python -m cat_train demo|bench|queue|options-doc ...`: each subcommand lives in its own module.

`-m` finds the package from the repository root only; from any other folder run the package folder
itself: `python /path/to/ComfyUI-CAT/cat_train demo --out out/demo` (relative paths stay the caller's).
"""
from __future__ import annotations

import importlib
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
    from cat_train.training.threads import configure_cpu_threads

    configure_cpu_threads()  # before torch loads: idle OpenMP workers sleep instead of spinning
    module = importlib.import_module(COMMANDS[argv[0]][0])
    configure_cpu_threads()  # torch is loaded now: as many threads as the load leaves cores
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
