"""Issue 32, leftovers: temp files of a save killed mid-write are removed at the next run in the folder (never
another live writer's), and a run that writes nothing leaves no folder holding only cat-run.json."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from cat_train.adapters.lora import LoraSpec
from cat_train.training import CatLossConfig, TrainConfig, build_examples, train
from cat_train.training.run_folder import RUN_FILE

import torch

LOSS = CatLossConfig(class_word="dog")


def examples(text):
    g = torch.Generator().manual_seed(0)
    return build_examples([(torch.randn(4, 8, 8, generator=g), "a photo of sks dog", ("sks",))], text, LOSS)


def run(den, text, folder, resume=None, **kw):
    cfg = TrainConfig(**{"steps": 4, "save_every": 2, "checkpoint_dir": str(folder), **kw})
    return train(den, examples(text), LOSS, LoraSpec(rank=2), cfg, resume=resume)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_resume_removes_temp_files_of_a_killed_save_and_no_live_writers(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "run"
    run(tiny_denoiser, text, folder, steps=2)
    old = time.time() - 3600  # an hour untouched
    killed = folder / f".cat-step000004.pt.tmp{dead_pid()}"  # what SIGKILL during torch.save leaves
    killed_record = folder / f".{RUN_FILE}.tmp{dead_pid()}"
    writing = folder / f".cat-step000004.pt.tmp{dead_pid()}1"  # touched just now: a save in progress (another host)
    live = folder / f".cat-step000004.pt.tmp{os.getppid()}"  # an old file of a live process: not ours to judge
    for f in (killed, killed_record, writing, live):
        f.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    for f in (killed, killed_record, live):
        os.utime(f, (old, old))
    res = run(tiny_denoiser, text, folder, resume=folder / "cat-step000002.pt")
    assert res.steps_done == 4 and (folder / "cat-step000004.pt").is_file()
    assert not killed.exists() and not killed_record.exists()
    assert writing.exists() and live.exists()


def test_a_run_that_writes_nothing_leaves_no_folder(tiny_denoiser, text, tmp_path):
    res = run(tiny_denoiser, text, tmp_path / "nothing", save_every=0)
    assert res.steps_done == 4 and not (tmp_path / "nothing").exists()  # was a folder holding only cat-run.json
    run(tiny_denoiser, text, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [RUN_FILE, "cat-step000002.pt",
                                                                      "cat-step000004.pt"]
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")  # a folder with anything else in it is kept whole
    run(tiny_denoiser, text, tmp_path / "kept", save_every=0)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [RUN_FILE, "notes.txt"]
