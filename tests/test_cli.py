"""`python -m cat_train ...` arguments are checked before any work, in one line, and the package runs
from any folder as `python path/to/cat_train ...`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cat_train"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # nothing but the command line may find the package
    return subprocess.run([sys.executable, str(PKG), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (("demo", "--out", "{file}/x"), "python -m cat_train demo: error: argument --out: {file}/x cannot be a folder: "
                                    "{file} is a file; choose another output folder"),
    pytest.param(("demo", "--out", "/proc/cat-x"), "argument --out: /proc/cat-x: cannot create folders in /proc",
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc on this system")),
    (("demo", "--out", "out", "--steps", "0"), "argument --steps: '0' is not a whole number >= 1"),
    (("bench", "kps", "--steps", "-1"), "python -m cat_train bench: error: argument --steps: '-1' is not a whole "
                                        "number >= 1"),
    (("bench", "kps", "--methods", "lora", "cat1:nope"), "argument --methods: unknown method 'cat1:nope'"),
    (("bench", "kps", "--lr", "nan"), "argument --lr: 'nan' is not a number > 0"),
    (("bench", "masked", "--methods", "cat1+nope"), "argument --methods: unknown method 'cat1+nope'"),
])
def test_bad_arguments_end_in_one_line_before_any_work(tmp_path, args, message):
    file = tmp_path / "a_file"
    file.write_text("")
    t0 = time.monotonic()
    r = cli(*(a.format(file=file) for a in args), cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(file=file) in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing created
    assert elapsed < 60, elapsed  # importing torch only; the world model was never built


def test_runs_from_any_folder(tmp_path):
    r = cli("queue", str(tmp_path / "missing.api.json"), cwd=tmp_path)
    assert r.returncode == 2 and "workflow file" in r.stderr and "does not exist" in r.stderr, r  # got to the command
    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "demo" in r.stdout and "queue" in r.stdout
