"""Kohya folders, captions and triggers, image decoding corner cases, buckets, bad input."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cat_train.data.dataset import (DatasetError, fit_to, load_dataset, load_image, make_buckets, nearest_bucket,
                                    scan_folder)


def png(path: Path, size=(40, 20), color=(10, 20, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def test_repeats_and_captions_from_txt_folder_and_root(tmp_path):
    png(tmp_path / "10_sks dog" / "a.png")
    png(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.txt").write_text("a photo of  sks dog\non grass\n")
    png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("  \n")  # an empty caption file counts as none
    png(tmp_path / "notes" / "ignored.png")
    recs = {r.path.name: r for r in scan_folder(tmp_path, ["sks"], class_word="dog")}
    assert set(recs) == {"a.png", "b.png", "c.png"}
    assert (recs["a.png"].repeats, recs["a.png"].caption) == (10, "sks dog")
    assert recs["b.png"].caption == "a photo of sks dog on grass"
    assert (recs["c.png"].repeats, recs["c.png"].caption, recs["c.png"].triggers) == (1, "sks dog", ("sks",))


@pytest.mark.parametrize("where, expected", [("prepend", "sks, a photo of a dog"), ("append", "a photo of a dog, sks")])
def test_trigger_insertion(tmp_path, where, expected):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of a dog")
    assert scan_folder(tmp_path, ["sks"], insert_trigger=where)[0].caption == expected


def test_insertion_off_names_the_file_and_the_fix(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of sksdog")  # no whole-word trigger
    with pytest.raises(DatasetError, match=r"a\.png.*add the token to a\.txt or turn trigger insertion on"):
        scan_folder(tmp_path, ["sks"], insert_trigger="off")


def test_multi_concept_folders_insert_their_own_trigger(tmp_path):
    png(tmp_path / "5_zwx cat" / "a.png")
    (tmp_path / "5_zwx cat" / "a.txt").write_text("a cat on a sofa")
    assert scan_folder(tmp_path, ["sks", "zwx"])[0].caption == "zwx, a cat on a sofa"


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 6, 6))  # a block, so JPEG chroma subsampling keeps it red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)
    r, g, b = out.getpixel((17, 2))  # the top-left block lands top-right
    assert r > 150 and g < 100


def test_rgba_on_white_grayscale_and_16_bit(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").getpixel((3, 3)) == (255, 255, 255)
    png(tmp_path / "g.png", color=77, mode="L")
    assert load_image(tmp_path / "g.png").getpixel((1, 1)) == (77, 77, 77)
    for value, expected in ((65535, 1.0), (32768, 128 / 127.5 - 1)):
        Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(tmp_path / "d.png")
        assert Image.open(tmp_path / "d.png").mode.startswith("I")
        px = fit_to(load_image(tmp_path / "d.png"), (8, 8))
        assert px.shape == (3, 8, 8) and torch.allclose(px, torch.full_like(px, expected), atol=1e-6)


def test_buckets():
    buckets = make_buckets(512, 64)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert (512, 512) in buckets
    w, h = nearest_bucket(2000, 1000, buckets)
    assert w / h >= 1.6
    assert nearest_bucket(300, 300, buckets) == (512, 512)


def test_load_dataset_buckets_and_square_mode(tmp_path):
    png(tmp_path / "wide.png", size=(200, 100))
    png(tmp_path / "square.png", size=(100, 100))
    ds = load_dataset(tmp_path, ["sks"], resolution=128, bucket_step=32)
    sizes = sorted(tuple(it.pixels.shape[1:]) for it in ds.items)
    assert sizes[0][1] > sizes[0][0] and sizes[1] == (128, 128)
    assert "2 images, 2 buckets" in ds.summary()
    ds = load_dataset(tmp_path, ["sks"], resolution=64, buckets=False)
    assert ds.buckets == {(64, 64): 2}
    assert ds.items[0].pixels.min() >= -1 and ds.items[0].pixels.max() <= 1


def test_corrupt_files_are_skipped_and_listed(tmp_path, caplog):
    png(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    ds = load_dataset(tmp_path, ["sks"], resolution=64)
    assert len(ds.items) == 1 and [p.name for p, _ in ds.skipped] == ["bad.jpg"]
    assert "bad.jpg" in caplog.text and "1 skipped" in ds.summary()
    (tmp_path / "good.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"no readable image.*bad\.jpg.*good\.png"):
        load_dataset(tmp_path, ["sks"], resolution=64)


def test_missing_and_empty_folders_and_triggers(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "nope", ["sks"])
    with pytest.raises(DatasetError, match="no images in"):
        scan_folder(tmp_path, ["sks"])
    with pytest.raises(DatasetError, match="trigger"):
        scan_folder(tmp_path, [""])


def test_real_photos_when_present():
    folder = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth-512" / "dog"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the DreamBooth photos live outside the project)")
    ds = load_dataset(folder, ["sks"], class_word="dog", resolution=256)
    assert len(ds.items) == 5 and all(it.caption == "sks dog" for it in ds.items)


@pytest.mark.parametrize("raw, caption, encoding", [
    ("café photo of sks dog".encode("cp1252"), "café photo of sks dog", "Windows-1252"),  # b"caf\xe9"
    ("naïve sks dog “quoted”".encode("cp1252"), "naïve sks dog “quoted”", "Windows-1252"),
    (b"sks dog \x81\xe9", "sks dog \x81é", "Latin-1"),  # 0x81 is undefined in cp1252
    ("sks dog ünd café".encode("utf-8"), "sks dog ünd café", None),
    (b"\xef\xbb\xbf" + "sks dog, café".encode("utf-8"), "sks dog, café", None),  # UTF-8 with a byte-order mark
    ("sks dog, café".encode("utf-16"), "sks dog, café", None),  # Notepad's "Unicode"
])
def test_captions_in_legacy_encodings_are_read_and_named(tmp_path, caplog, raw, caption, encoding):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(raw)
    rec = scan_folder(tmp_path, ["sks"])[0]
    assert (rec.caption, rec.caption_encoding) == (caption, encoding)
    if encoding:
        assert f"{tmp_path / 'a.txt'} ({encoding}: {caption!r})" in caplog.text
        assert "re-save the file as UTF-8" in caplog.text
        assert "a.txt" in load_dataset(tmp_path, ["sks"], resolution=64).warnings[0]
    else:
        assert "not UTF-8" not in caplog.text


def test_broken_utf16_caption_names_the_file(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfes\x00k\x00s")  # a byte-order mark, then an odd byte count
    with pytest.raises(DatasetError, match=r"caption file .*a\.txt starts like UTF-16.*re-save it as UTF-8"):
        scan_folder(tmp_path, ["sks"])


def test_images_under_the_minimum_size_are_warned_about(tmp_path, caplog):
    png(tmp_path / "dot.png", size=(1, 1))
    png(tmp_path / "thin.png", size=(200, 63))
    png(tmp_path / "ok.png", size=(64, 64))
    ds = load_dataset(tmp_path, ["sks"], resolution=128)
    assert len(ds.items) == 3  # still trained: small images can be intended
    assert len(ds.warnings) == 1
    w = ds.warnings[0]
    assert w.startswith("2 image(s) in") and "smaller than 64 px on a side: dot.png (1x1), thin.png (200x63)" in w
    assert "ok.png" not in w and w in caplog.text
    (tmp_path / "dot.png").unlink()
    (tmp_path / "thin.png").unlink()
    assert load_dataset(tmp_path, ["sks"], resolution=128).warnings == []


@pytest.mark.parametrize("trigger, class_word", [("toy", "toy"), ("Toy", "toy"), ("sks", "dog"), ("zwx", " ZWX ")])
def test_trigger_equal_to_the_class_word_is_refused(tmp_path, trigger, class_word):
    png(tmp_path / "a.png")
    if trigger == "sks":
        assert scan_folder(tmp_path, [trigger], class_word=class_word)[0].caption == "sks dog"
        return
    with pytest.raises(DatasetError, match=rf"trigger '{trigger}' is the same word as class_word '{class_word.strip()}'"
                                           r".*\(y\) would equal the training caption \(y_T\).*e\.g\. 'sks'"):
        scan_folder(tmp_path, [trigger], class_word=class_word)


def test_per_trigger_class_words_name_captionless_images(tmp_path):
    from PIL import Image

    from cat_train.data.dataset import DatasetError, scan_folder

    Image.new("RGB", (96, 96), (10, 200, 30)).save(tmp_path / "a.png")  # no caption file
    recs = scan_folder(tmp_path, ("zwx", "sks"), "sks=dog, zwx=cat")
    assert [r.caption for r in recs] == ["zwx cat"]  # the first trigger with its own class word
    with pytest.raises(DatasetError, match="trigger 'cat' is the same word"):
        scan_folder(tmp_path, ("cat",), "cat=cat")
