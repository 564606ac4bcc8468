"""`python -m cat_train bench kps|masked`: which benchmark on the world runs, each in its own module (bench.py:
knowledge preservation; masked_bench.py: masked training), so neither imports the other's command line."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "masked":
        from .masked_bench import main as masked
        return masked(argv[1:])
    from .bench import main as kps
    return kps(argv)
