"""Issue 22, lost or overwritten: a checkpoint folder belongs to one run, a resume continues the run it names,
storage is checked before step 1 and a failed save leaves no temp file."""
from __future__ import annotations

import errno
import json
import shutil
import types

import pytest
import torch

from cat_train.training import run_folder
from cat_train.adapters.lora import LoraSpec, lora_layers
from cat_train.training import CatLossConfig
from cat_train.training.run_folder import RUN_FILE, StorageError
from cat_train.training import TrainConfig, build_examples, train

LOSS = CatLossConfig(class_word="dog")


def examples(text, caption="a photo of sks dog", seed=0, triggers=("sks",), loss=LOSS):
    g = torch.Generator().manual_seed(seed)
    return build_examples([(torch.randn(4, 8, 8, generator=g), caption, triggers)], text, loss)


def run(den, exs, folder, loss=LOSS, resume=None, **kw):
    cfg = TrainConfig(**{"steps": 4, "save_every": 2, "checkpoint_dir": str(folder), **kw})
    return train(den, exs, loss, LoraSpec(rank=2), cfg, resume=resume)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("cat-step*.pt"))}


def test_a_second_run_with_other_settings_is_refused_and_the_first_run_kept(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "x"
    run(tiny_denoiser, examples(text), folder)
    first = snapshot(folder)
    assert set(first) == {"cat-step000002.pt", "cat-step000004.pt"}
    rid = json.loads((folder / RUN_FILE).read_text())["run_id"]
    with pytest.raises(ValueError) as err:
        run(tiny_denoiser, examples(text), folder, lr=2e-4)
    msg = str(err.value)
    assert f"belongs to another run (run {rid})" in msg and "lr 0.0001 -> 0.0002" in msg, msg
    assert "checkpoint_name" in msg, msg
    with pytest.raises(ValueError, match=r"loss alpha 1\.0 -> 0\.0"):  # the README's cat_factor sweep into one folder
        run(tiny_denoiser, examples(text), folder, loss=CatLossConfig(class_word="dog", alpha=0.0))
    with pytest.raises(ValueError, match="the dataset"):
        run(tiny_denoiser, examples(text, seed=1), folder)
    assert snapshot(folder) == first  # nothing overwritten
    assert not lora_layers(tiny_denoiser.module)


def test_the_same_run_again_may_use_its_folder(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "x"
    run(tiny_denoiser, examples(text), folder)
    first = snapshot(folder)
    run(tiny_denoiser, examples(text), folder, save_every=1)  # save_every changes no weight: same run
    assert snapshot(folder)["cat-step000004.pt"] != b"" and len(snapshot(folder)) == 4
    assert {k: len(v) for k, v in first.items()} == {k: len(snapshot(folder)[k]) for k in first}


def test_a_folder_with_checkpoints_but_no_record_is_not_overwritten(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "old"
    run(tiny_denoiser, examples(text), folder)
    (folder / RUN_FILE).unlink()  # as written before runs recorded themselves
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run"):
        run(tiny_denoiser, examples(text), folder)


@pytest.mark.parametrize("change, named", [
    (dict(lr=3e-4), "lr 0.0001 -> 0.0003"),
    (dict(seed=5), "seed 0 -> 5"),
    (dict(loss=CatLossConfig(class_word="dog", alpha=2.0)), "loss alpha 1.0 -> 2.0"),
    (dict(exs_seed=3), "the dataset"),
    (dict(triggers="zwx"), "the dataset"),
])
def test_resume_refuses_every_setting_that_changes_the_result(tiny_denoiser, text, tmp_path, change, named):
    folder = tmp_path / "r"
    run(tiny_denoiser, examples(text), folder, steps=2)
    kw = dict(change)
    exs = examples(text, seed=kw.pop("exs_seed", 0))
    if kw.pop("triggers", None):
        exs = examples(text, caption="a photo of zwx dog", triggers=("zwx",))
    with pytest.raises(ValueError) as err:
        run(tiny_denoiser, exs, tmp_path / "r2", resume=folder / "cat-step000002.pt", **kw)
    assert named in str(err.value) and "was written by a run with other settings" in str(err.value), str(err.value)
    assert not (tmp_path / "r2").exists()  # refused before anything was written


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "r"
    run(tiny_denoiser, examples(text), folder)
    with pytest.raises(ValueError, match="is at step 4 but steps is 2; set steps to more than 4"):
        run(tiny_denoiser, examples(text), folder, steps=2, resume=folder / "cat-step000004.pt")


def test_resume_in_its_own_folder_continues_and_a_longer_constant_run_is_the_same_run(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "r"
    run(tiny_denoiser, examples(text), folder)
    res = run(tiny_denoiser, examples(text), folder, steps=6, resume=folder / "cat-step000004.pt")
    assert res.steps_done == 6 and (folder / "cat-step000006.pt").is_file()


def test_resume_on_another_family_names_both(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "r"
    run(tiny_denoiser, examples(text), folder, steps=2)
    tiny_denoiser.family = types.SimpleNamespace(name="sdxl")
    with pytest.raises(ValueError, match="was trained on an SD1.x/SD2 model, this model is SDXL; resume it on the "
                                         "SD1.x/SD2 model"):
        run(tiny_denoiser, examples(text), tmp_path / "r2", resume=folder / "cat-step000002.pt")


def test_a_truncated_checkpoint_is_called_damaged_and_the_previous_one_named(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "r"
    run(tiny_denoiser, examples(text), folder)
    last = folder / "cat-step000004.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        run(tiny_denoiser, examples(text), folder, steps=6, resume=last)
    msg = str(err.value)
    assert "is damaged" in msg and f"resume from the previous checkpoint {folder / 'cat-step000002.pt'}" in msg, msg
    assert "not a CAT training checkpoint" not in msg


def test_a_full_disk_at_a_save_removes_the_temp_file_and_says_so(tiny_denoiser, text, tmp_path, monkeypatch):
    real = torch.save

    def full(obj, f, *a, **k):  # writes part of the file, then the disk is full
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    folder = tmp_path / "full"
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageError) as err:
        run(tiny_denoiser, examples(text), folder)
    monkeypatch.setattr(torch, "save", real)
    msg = str(err.value)
    assert "cannot write checkpoint" in msg and "No space left on device" in msg, msg
    assert "partial file was removed" in msg, msg
    assert not folder.exists()  # no hidden .tmp left to keep the disk full (nor a folder: nothing was written)


def test_torchs_unexpected_pos_is_reported_as_a_failed_write(tmp_path, monkeypatch):
    def broken(obj, f, *a, **k):
        open(f, "wb").close()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(StorageError, match="the write failed"):
        run_folder.atomic_save({}, tmp_path / "cat-step000001.pt", "fix")
    assert list(tmp_path.iterdir()) == []


def test_no_room_for_a_checkpoint_is_refused_before_step_1(tiny_denoiser, text, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=1000))
    steps = []
    with pytest.raises(StorageError, match=r"has 0\.0 MB free, but .* are needed"):
        train(tiny_denoiser, examples(text), LOSS, LoraSpec(rank=2),
              TrainConfig(steps=4, save_every=2, checkpoint_dir=str(tmp_path / "c")), callback=steps.append)
    assert steps == [] and not list((tmp_path / "c").glob("cat-step*"))


def test_a_read_only_checkpoint_folder_is_refused_before_step_1(tiny_denoiser, text, tmp_path, monkeypatch):
    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(run_folder.tempfile, "mkstemp", ro)
    with pytest.raises(StorageError, match="cannot be written \\(Read-only file system\\); choose another checkpoint "
                                           "folder"):
        run(tiny_denoiser, examples(text), tmp_path / "ro")


def test_with_own_folder_a_second_run_gets_its_own_folder_and_finds_it_again(tiny_denoiser, text, tmp_path):
    folder = tmp_path / "x"
    run(tiny_denoiser, examples(text), folder)
    first = snapshot(folder)
    cfg = TrainConfig(steps=4, save_every=2, checkpoint_dir=str(folder), lr=2e-4)
    res = train(tiny_denoiser, examples(text), LOSS, LoraSpec(rank=2), cfg, own_folder=True)
    rid = json.loads((res.last_checkpoint.parent / RUN_FILE).read_text())["run_id"]
    assert res.last_checkpoint == tmp_path / f"x_{rid}" / "cat-step000004.pt"
    assert snapshot(folder) == first  # the first run's files untouched
    (note,) = res.warnings
    assert note.startswith(f"checkpoint folder {folder} belongs to another run") and "lr 0.0001 -> 0.0002" in note
    assert f"this run's checkpoints go to {tmp_path / f'x_{rid}'} instead" in note
    again = train(tiny_denoiser, examples(text), LOSS, LoraSpec(rank=2), cfg, own_folder=True)
    assert again.last_checkpoint == res.last_checkpoint  # the same settings find the same folder
    resumed = train(tiny_denoiser, examples(text), LOSS, LoraSpec(rank=2),
                    TrainConfig(steps=6, save_every=2, checkpoint_dir=str(folder), lr=2e-4), own_folder=True,
                    resume=res.last_checkpoint)
    assert resumed.steps_done == 6 and (tmp_path / f"x_{rid}" / "cat-step000006.pt").is_file()


def test_a_re_encode_that_differs_in_the_last_bits_is_the_same_dataset_another_image_is_not(text):
    from cat_train.training.run_folder import data_fingerprint, same_data

    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(50)]
    base = data_fingerprint(build_examples(items, text, LOSS))
    noisy_items = [(lat * (1 + 1e-6 * torch.randn(lat.shape, generator=g)), cap, trig) for lat, cap, trig in items]
    assert same_data(base, data_fingerprint(build_examples(noisy_items, text, LOSS)))  # a GPU re-encode after a restart
    swapped = list(items)
    swapped[17] = (torch.randn(4, 8, 8, generator=g), *items[17][1:])
    assert not same_data(base, data_fingerprint(build_examples(swapped, text, LOSS)))  # one image of 50
    reordered = items[1:] + items[:1]
    assert not same_data(base, data_fingerprint(build_examples(reordered, text, LOSS)))  # the draw order changes
    recaptioned = list(items)
    recaptioned[3] = (items[3][0], "a photo of sks cat 3", ("sks",))
    assert not same_data(base, data_fingerprint(build_examples(recaptioned, text, LOSS)))
