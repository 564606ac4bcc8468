"""Mask files and alpha channels (masked training): pairing, never trained as images, resized with the image's
bucket."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cat_train.data.dataset import DatasetError, load_dataset, scan_folder
from cat_train.data.masks import latent_mask


def left_white(path: Path, size, frac=0.5, mode="L") -> Path:
    """A mask (or an RGBA image) white/opaque on the left `frac` of the width."""
    w, h = size
    a = np.zeros((h, w), np.uint8)
    a[:, : round(w * frac)] = 255
    if mode == "RGBA":
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., :3] = (200, 30, 30)
        rgba[..., 3] = a
        Image.fromarray(rgba, "RGBA").save(path)
    else:
        Image.fromarray(a, "L").save(path)
    return path


def rgb(path: Path, size=(128, 64), color=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def folder(tmp_path):
    rgb(tmp_path / "a.png", (128, 64))
    left_white(tmp_path / "a-masklabel.png", (128, 64), 0.25)
    rgb(tmp_path / "b.jpg", (64, 64))
    left_white(tmp_path / "c.png", (64, 128), 0.5, mode="RGBA")  # alpha, no mask file
    return tmp_path


def by_name(ds):
    return {it.path.name: it for it in ds.items}


def test_mask_files_pair_and_are_not_training_images(tmp_path):
    folder(tmp_path)
    recs = {r.path.name: r for r in scan_folder(tmp_path, ["sks"], class_word="dog")}
    assert set(recs) == {"a.png", "b.jpg", "c.png"}  # a-masklabel.png is no image of its own
    assert recs["a.png"].mask_file == tmp_path / "a-masklabel.png"
    assert recs["b.jpg"].mask_file is None and recs["c.png"].mask_file is None


def test_masks_off_reads_none_and_says_the_files_are_unused(tmp_path):
    ds = load_dataset(folder(tmp_path), ["sks"], class_word="dog", resolution=64)
    assert all(it.mask is None for it in ds.items) and len(ds.items) == 3
    assert any("1 mask file(s)" in w and "masks is off" in w for w in ds.warnings)
    assert "with masks" not in ds.summary()


def test_auto_file_and_alpha_sources_with_buckets(tmp_path):
    folder(tmp_path)
    ds = load_dataset(tmp_path, ["sks"], class_word="dog", resolution=128, masks="auto")
    items = by_name(ds)
    a, c = items["a.png"], items["c.png"]
    assert a.pixels.shape == (3, 64, 128) and a.mask.shape == (64, 128)  # the 2:1 bucket, mask on the same pixels
    assert a.mask[:, :30].min() == 1.0 and a.mask[:, 34:].max() == 0.0
    assert a.mask.mean().item() == pytest.approx(0.25, abs=0.01)
    assert items["b.jpg"].mask is None and items["b.jpg"].pixels.shape == (3, 128, 128)
    assert c.pixels.shape == (3, 128, 64) and c.mask.mean().item() == pytest.approx(0.5, abs=0.01)  # from alpha
    assert (c.pixels[:, :, 40:] == 1.0).all()  # transparent pixels still composited on white
    assert "2 with masks" in ds.summary()
    assert any("2 of 3 images have a mask" in w for w in ds.warnings)
    only_files = by_name(load_dataset(tmp_path, ["sks"], class_word="dog", resolution=64, masks="file"))
    assert only_files["a.png"].mask is not None and only_files["c.png"].mask is None
    only_alpha = by_name(load_dataset(tmp_path, ["sks"], class_word="dog", resolution=64, masks="alpha"))
    assert only_alpha["a.png"].mask is None and only_alpha["c.png"].mask is not None
    lat = latent_mask(a.mask, (8, 16))
    assert lat.shape == (1, 8, 16) and lat[0, :, :4].min() == 1.0 and lat[0, :, 4:].max() == 0.0


def test_square_mode_crops_the_mask_as_the_image(tmp_path):
    rgb(tmp_path / "a.png", (128, 64))
    left_white(tmp_path / "a-masklabel.png", (128, 64), 0.25)  # white on x < 32 of 128
    ds = load_dataset(tmp_path, ["sks"], resolution=64, buckets=False, masks="file")
    m = ds.items[0].mask  # cover-resize to 128x64 then centre crop 64: x in [32, 96) of the original
    assert m.shape == (64, 64) and m.max().item() < 0.05


@pytest.mark.parametrize("masks", ["off", "auto", "file"])
def test_a_bad_mask_file_keeps_its_image_and_names_the_mask(tmp_path, masks):
    """Issue 32: a wrong-sized or unreadable -masklabel.png dropped its good image from training (masks on or not)
    and called the image "unreadable"; now the image trains (without a mask) and the mask file is named."""
    rgb(tmp_path / "a.png", (64, 64))
    left_white(tmp_path / "a-masklabel.png", (32, 32))
    rgb(tmp_path / "b.png", (64, 64))
    (tmp_path / "b-masklabel.png").write_bytes(b"not a png")
    rgb(tmp_path / "c.png", (64, 64))
    ds = load_dataset(tmp_path, ["sks"], resolution=64, masks=masks)
    assert [it.path.name for it in ds.items] == ["a.png", "b.png", "c.png"] and ds.skipped == []
    assert all(it.mask is None for it in ds.items)
    if masks == "off":  # masks not read at all: nothing about them is wrong
        assert ds.mask_problems == []
        return
    a, b = ds.mask_problems
    assert a.startswith(f"mask {tmp_path / 'a-masklabel.png'} is 32x32 but its image a.png is 64x64; save the mask at "
                        "the image's size"), a
    assert b.startswith(f"mask {tmp_path / 'b-masklabel.png'} cannot be read (UnidentifiedImageError"), b
    assert b.endswith("re-save it as a greyscale PNG at its image's size (64x64), or remove it"), b
    note = next(w for w in ds.warnings if "mask file(s) not used" in w)
    assert note.startswith("2 mask file(s) not used, their images train without a mask") and "unreadable" not in note


def test_bad_mask_source_is_refused(tmp_path):
    rgb(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="masks must be one of off, auto, file, alpha"):
        load_dataset(tmp_path, ["sks"], resolution=64, masks="yes")


def test_images_are_bit_identical_with_masks_on(tmp_path):
    folder(tmp_path)
    off = by_name(load_dataset(tmp_path, ["sks"], resolution=64))
    on = by_name(load_dataset(tmp_path, ["sks"], resolution=64, masks="auto"))
    assert all(torch.equal(off[k].pixels, on[k].pixels) for k in off)


def test_opaque_alpha_is_no_mask_and_auto_without_masks_says_nothing(tmp_path):
    rgb(tmp_path / "a.png")
    Image.new("RGBA", (128, 64), (1, 2, 3, 255)).save(tmp_path / "b.png")
    ds = load_dataset(tmp_path, ["sks"], resolution=64, masks="auto")
    assert all(it.mask is None for it in ds.items)
    assert ds.warnings == [] and "with masks" not in ds.summary()
    alpha = load_dataset(tmp_path, ["sks"], resolution=64, masks="alpha")
    assert any("0 of 2 images have a mask" in w for w in alpha.warnings)  # asked for and none found: said


def test_a_mask_in_colour_is_named_with_what_it_weighs(tmp_path):
    """Issue 32: a red-on-black mask was read by luminance (subject weight 0.30) without a word."""
    rgb(tmp_path / "a.png", (64, 64))
    rgb(tmp_path / "b.png", (64, 64))
    red = np.zeros((64, 64, 3), np.uint8)
    red[:, :32] = (255, 0, 0)
    Image.fromarray(red, "RGB").save(tmp_path / "a-masklabel.png")
    grey = np.zeros((64, 64, 3), np.uint8)
    grey[:, :32] = 255  # RGB file, grey pixels: a mask as meant
    Image.fromarray(grey, "RGB").save(tmp_path / "b-masklabel.png")
    ds = load_dataset(tmp_path, ["sks"], resolution=64, buckets=False, masks="file")
    assert float(ds.items[0].mask.max()) == pytest.approx(76 / 255)  # what the red subject weighs
    assert float(ds.items[1].mask.max()) == 1.0
    assert ("1 mask file(s) are in colour (a-masklabel.png): read as grey by luminance (pure red weighs 0.30 of "
            "white, green 0.59, blue 0.11); save masks as greyscale, white = subject, black = background.") \
        in ds.warnings, ds.warnings


def test_a_folder_of_only_mask_files_says_so(tmp_path):
    for name in ("a", "b", "c", "d"):
        left_white(tmp_path / f"{name}-masklabel.png", (64, 64))
    with pytest.raises(DatasetError) as err:
        scan_folder(tmp_path, ["sks"])
    assert str(err.value) == (f"{tmp_path} holds only mask files (4: a-masklabel.png, b-masklabel.png, "
                              "c-masklabel.png, ...): a mask goes beside its image (a.png and a-masklabel.png); "
                              "put the training images in the folder too."), str(err.value)
