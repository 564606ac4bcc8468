"""Issue 22, dataset cases: each raw error named, each silent case warned, the walk and the decode bounded."""
from __future__ import annotations

import os
import time

import pytest
from PIL import Image

from cat_train.data import dataset as ds_mod
from cat_train.data.dataset import DatasetError, load_dataset, plan_dataset, scan_folder
from test_dataset import png


def test_a_decompression_bomb_is_named_and_skipped_like_other_unreadable_files(tmp_path, monkeypatch):
    png(tmp_path / "ok.png", (64, 64))
    png(tmp_path / "huge.png", (300, 300))  # 90,000 px: over 2 x the limit set below, as 14000x14000 is over 2 x 89 MP
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    ds = load_dataset(tmp_path, ["sks"], resolution=64)
    assert [it.path.name for it in ds.items] == ["ok.png"]
    (path, why), = ds.skipped
    assert path.name == "huge.png" and "too large to decode safely" in why and "downscale it" in why, why


@pytest.mark.parametrize("ext, named", [("", "caption_extension is empty"), (".", "caption_extension is empty"),
                                        (".jpg", "caption_extension '.jpg' is an image extension"),
                                        ("png", "caption_extension '.png' is an image extension")])
def test_a_caption_extension_that_cannot_name_captions_is_refused(tmp_path, ext, named):
    png(tmp_path / "a.png")
    with pytest.raises(DatasetError) as err:
        scan_folder(tmp_path, ["sks"], caption_ext=ext)
    assert named in str(err.value) and "'.txt'" in str(err.value)


def test_gif_heic_svg_are_named_as_skipped(tmp_path):
    png(tmp_path / "a.png", (64, 64))
    Image.new("RGB", (64, 64)).save(tmp_path / "anim.gif")
    (tmp_path / "phone.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "logo.svg").write_text("<svg/>")
    (tmp_path / "a.txt").write_text("sks dog")
    ds = load_dataset(tmp_path, ["sks"], resolution=64)
    assert len(ds.items) == 1
    assert sorted(p.name for p, _ in ds.skipped) == ["anim.gif", "logo.svg", "phone.HEIC"]
    assert all("convert it to PNG or JPEG" in why for _, why in ds.skipped)
    assert "3 skipped" in ds.summary()


def test_a_symlink_loop_is_read_once(tmp_path):
    png(tmp_path / "a.png", (64, 64))
    png(tmp_path / "b.png", (64, 64))
    os.symlink(".", tmp_path / "10_loop")
    os.symlink(str(tmp_path), tmp_path / "3_again")
    ds = load_dataset(tmp_path, ["sks"], resolution=64)
    assert sorted((it.path.name, it.repeats) for it in ds.items) == [("a.png", 1), ("b.png", 1)]
    assert sum("already read" in w for w in ds.warnings) == 2


def test_duplicate_triggers_and_triggers_in_no_caption_are_warned(tmp_path):
    png(tmp_path / "a.png", (64, 64))
    (tmp_path / "a.txt").write_text("a photo of sks dog")
    png(tmp_path / "b.png", (64, 64))
    (tmp_path / "b.txt").write_text("zwx on grass")
    triggers = ["sks", "zwx", "sks"] + [f"tok{i}" for i in range(10)]
    ds = load_dataset(tmp_path, triggers, resolution=64)
    assert any("lists 'sks' more than once; each is used once" in w for w in ds.warnings), ds.warnings
    unused = [w for w in ds.warnings if "appear in no caption" in w]
    assert len(unused) == 1 and "2 more" in unused[0]
    assert unused[0].startswith("10 of 12 triggers appear in no caption ('tok0'")
    assert scan_folder(tmp_path, triggers)[0].triggers == ("sks",)


def test_all_triggers_used_gives_no_trigger_note(tmp_path):
    png(tmp_path / "a.png", (64, 64))
    (tmp_path / "a.txt").write_text("sks and zwx")
    assert load_dataset(tmp_path, ["sks", "zwx"], resolution=64).warnings == []


@pytest.mark.parametrize("res, use", [(100, 128), (96, 128), (32, 64), (500, 512)])
def test_a_resolution_off_the_bucket_grid_is_refused(tmp_path, res, use):
    png(tmp_path / "a.png", (64, 64))
    with pytest.raises(DatasetError, match=f"resolution {res} is not a multiple of 64 .*: use {use}"):
        load_dataset(tmp_path, ["sks"], resolution=res)


def test_a_huge_folder_is_refused_before_a_full_walk(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_mod, "MAX_FILES", 50)
    for i in range(3):
        sub = tmp_path / f"{i + 1}_sks" / "deep"
        sub.mkdir(parents=True)
        for j in range(30):
            (sub.parent / f"f{j}.dat").write_bytes(b"")
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="holds more than 50 files .* is it the right folder"):
        scan_folder(tmp_path, ["sks"])
    assert time.perf_counter() - t0 < 2


def test_usr_like_folder_is_refused_quickly():
    t0 = time.perf_counter()
    with pytest.raises(DatasetError):  # no N_name folders: nothing under it is walked
        scan_folder("/usr", ["sks"])
    assert time.perf_counter() - t0 < 5


def test_images_are_decoded_one_at_a_time_with_a_budget_line(tmp_path, monkeypatch):
    for i in range(5):
        png(tmp_path / f"{i}.png", (64, 64))
    calls = []
    real = ds_mod.load_image
    monkeypatch.setattr(ds_mod, "load_image", lambda p: calls.append(p) or real(p))
    plan = plan_dataset(tmp_path, ["sks"], resolution=128, buckets=False)
    assert calls == []  # scanning decodes nothing
    assert plan.budget().startswith(f"dataset {tmp_path}: 5 images, decoded one at a time (0.2 MB of pixels at most")
    gen = plan.decode()
    first = next(gen)
    assert len(calls) == 1 and tuple(first.pixels.shape) == (3, 128, 128)
    rest = list(gen)
    assert len(calls) == 5 and len(rest) == 4 and plan.finish(5) == []
