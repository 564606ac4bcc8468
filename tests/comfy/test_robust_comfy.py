"""Issue 22, node side: ranges ComfyUI does not check, names too long for the filesystem, Cancel in the dataset's
encode and the trainer's preparation, storage checked before work, blank images refused by the KPS Evaluator."""
from __future__ import annotations

import asyncio
import errno
import time

import pytest
import torch

from conftest import pack_module, progress_hook
from test_bad_inputs import graph


@pytest.fixture
def ready(comfy, test_checkpoint_node, dataset_dir):
    return comfy


def _errors(g) -> dict[str, list[str]]:
    import execution

    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("v", g, None))
    assert not ok
    return {nid: [e["details"] for e in ne["errors"]] for nid, ne in node_errors.items()}


@pytest.mark.parametrize("field, value, message", [
    ("resolution", 100, "resolution 100 is not a multiple of 64 (>= 64); bucket sides are multiples of 64: use 128"),
    ("resolution", 8192, "resolution 8192 is out of range: use a value from 64 to 4096"),
    ("caption_extension", "", "caption_extension is empty"),
    ("caption_extension", ".jpg", "caption_extension '.jpg' is an image extension"),
])
def test_dataset_inputs_comfyui_does_not_check_are_refused_in_validation(ready, field, value, message):
    g = graph()
    g["2"]["inputs"][field] = value
    details = _errors(g)
    assert any(message in d for d in details["2"]), details


def _with_apt(**apt) -> dict:
    g = graph()
    g["6"] = {"class_type": "CAT_AptOptions", "inputs": {"adaptive": 1.0, "stabilize": 5.0, "align": 1000.0, "bins": 10,
                                                         "augment": "flip", **apt}}
    g["3"]["inputs"]["apt"] = ["6", 0]
    return g


@pytest.mark.parametrize("apt, message", [  # ranges: ComfyUI's own check, under that input only (issue 32)
    ({"bins": 1_000_000}, "Value 1000000 bigger than max of 100: bins"),
    ({"align": 1e9}, "Value 1000000000.0 bigger than max of"),
    ({"ema": 5.0}, "Value 5.0 bigger than max of 0.999: ema"),
    ({"stabilize_layers": "((("}, "APT stabilize_layers '(((' is not a valid regular expression"),
    ({"align_layers": "[x"}, "APT align_layers '[x' is not a valid regular expression"),
])
def test_apt_options_ranges_and_patterns_are_checked(ready, apt, message):
    import execution

    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("v", _with_apt(**apt), None))
    assert not ok
    found = [f"{e['message']}: {e['details']}" for e in node_errors["6"]["errors"]]
    assert any(message in d for d in found), found


def test_apt_options_in_range_validate(ready):
    import execution

    ok, err, _, node_errors = asyncio.run(execution.validate_prompt("v", _with_apt(bins=100), None))
    assert ok, (err, node_errors)


def test_names_too_long_for_the_filesystem_fail_validation(ready):
    details = _errors(graph(checkpoint_name="c" * 300, save_name="s" * 230))
    assert any("checkpoint_name 'cccccccccccccccccccccccc'... is 300 bytes long: this filesystem allows 255" in d
               for d in details["4"]), details
    assert any("LoRA name 'ssssssssssssssssssssssss'... is 230 bytes long" in d and "at most 223" in d
               for d in details["5"]), details
    ok, *_ = asyncio.run(__import__("execution").validate_prompt("v", graph(checkpoint_name="c" * 223), None))
    assert ok


def test_cancel_during_the_dataset_encode_stops_within_one_image(ready, tiny_sd15, dataset_dir, monkeypatch):
    import comfy.model_management as mm

    _, clip, vae = tiny_sd15
    ds_node = pack_module(ready, "nodes.dataset")
    encoded = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda px: encoded.append(1) or real(px))

    def hook(value, total, preview, node_id=None):  # Cancel pressed after the first image
        if value == 1:
            mm.interrupt_current_processing(True)
    try:
        with progress_hook(hook), pytest.raises(mm.InterruptProcessingException):
            ds_node.build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    finally:
        mm.interrupt_current_processing(False)
    assert len(encoded) == 2  # the image in hand finishes; the third is never decoded
    ds = ds_node.build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    assert len(ds.items) == 3 and ds.budget.startswith(f"dataset {dataset_dir}: 3 images, decoded one at a time")


def test_cancel_during_the_trainers_preparation_stops_before_step_1(ready, tiny_sd15, dataset_dir, tmp_path):
    import comfy.model_management as mm

    mp, clip, vae = tiny_sd15
    tr = pack_module(ready, "nodes.trainer")
    A, L, T = (pack_module(ready, f"cat_train.{m}") for m in ("adapters.lora", "training", "training"))
    ds = pack_module(ready, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    ds._text_cache.clear()
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if total == 9 and value == 2:  # 3 images: up to 6 prompts + 3 examples; Cancel during the CLIP encode
            mm.interrupt_current_processing(True)
    cfg = T.TrainConfig(steps=50, lr=1e-2, save_every=1, checkpoint_dir=str(tmp_path / "ck"))
    t0 = time.monotonic()
    try:
        with progress_hook(hook), pytest.raises(mm.InterruptProcessingException):
            tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0), cfg)
    finally:
        mm.interrupt_current_processing(False)
    assert seen == [(1, 9), (2, 9)], seen  # no training step, no 50-step bar
    assert not (tmp_path / "ck").exists() and time.monotonic() - t0 < 30


def test_a_read_only_loras_folder_is_named_before_saving(ready, monkeypatch):
    RF = pack_module(ready, "cat_train.training.run_folder")
    save = ready.nodes.NODE_CLASS_MAPPINGS["CAT_SaveLora"]

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(RF.tempfile, "mkstemp", ro)
    with pytest.raises(OSError) as err:
        save.execute({"w": torch.zeros(4)}, "ro_test")
    assert "loras folder" in str(err.value) and "cannot be written (Read-only file system)" in str(err.value)


def test_a_full_loras_folder_is_refused_before_the_trainer_starts(ready, monkeypatch):
    import shutil
    import types

    from conftest import run_prompt

    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=4096))
    for save_every in (10, 0):  # step LoRAs, or only the Save CAT LoRA node the trainer feeds
        g = graph(steps=100000, checkpoint_name="full_disk")
        g["4"]["inputs"]["save_every"] = save_every
        t0 = time.monotonic()
        ex = run_prompt(g)
        assert not ex.success
        name, data = ex.status_messages[-1]
        assert data["node_type"] == "CAT_LoraTrainer" and "loras folder" in data["exception_message"], data
        assert "MB are needed; free some space there" in data["exception_message"]
        assert ("checkpoint_name" if save_every else "Save CAT LoRA's name") in data["exception_message"]
        assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("blank", ["black", "nan"])
def test_kps_evaluator_refuses_blank_and_nan_images(ready, blank):
    ev = pack_module(ready, "nodes.evaluate")
    good = torch.rand(2, 16, 16, 3)
    bad = torch.zeros(2, 16, 16, 3) if blank == "black" else good.clone().index_fill_(1, torch.tensor([3]), float("nan"))
    with pytest.raises(ValueError, match="images_without_trigger image 1 of 2 (is blank|holds NaN)"):
        ev.evaluate(good, bad, None, "", "any.pt", "ViT-B-32")


def test_the_dataset_fingerprint_reads_only_the_folders_it_trains_on(ready, tmp_path):
    node = ready.nodes.NODE_CLASS_MAPPINGS["CAT_Dataset"]
    (tmp_path / "10_sks").mkdir()
    (tmp_path / "10_sks" / "a.png").write_bytes(b"x")
    deep = tmp_path / "junk" / "deeper"
    deep.mkdir(parents=True)
    for i in range(50):
        (deep / f"{i}.bin").write_bytes(b"")
    fp = node.fingerprint_inputs(str(tmp_path), ".txt")
    assert [p for p, _ in fp] == [str(tmp_path / "10_sks" / "a.png")]
    t0 = time.monotonic()
    node.fingerprint_inputs("/usr", ".txt")
    assert time.monotonic() - t0 < 5


def test_the_dataset_info_names_skipped_formats_and_the_budget(ready, tiny_sd15, tmp_path):
    from PIL import Image

    _, clip, vae = tiny_sd15
    ds_node = pack_module(ready, "nodes.dataset")
    Image.new("RGB", (128, 128), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (128, 128)).save(tmp_path / "b.gif")
    (tmp_path / "c.heic").write_bytes(b"\0")
    ds = ds_node.build_dataset(tmp_path, vae, clip, ("sks", "sks", "zwx"), "dog", ".txt", 128, True)
    text = ds_node.info(ds)
    assert (f"skipped 2 file(s):\n- {tmp_path / 'b.gif'}: .gif is not a format the trainer reads; convert it to PNG or "
            f"JPEG to train on it.\n- {tmp_path / 'c.heic'}: .heic is not a format") in text, text
    assert "1 of 2 triggers appear in no caption ('zwx')" in text and "'sks' more than once" in text, text
    assert text.endswith("decoded one at a time (0.2 MB of pixels at most at once), latents kept: at most 0.0 MB"), text
    assert ds.triggers == ("sks", "zwx")


def test_two_queued_runs_with_one_checkpoint_name_keep_their_own_checkpoints(ready):
    from conftest import run_prompt

    tr = pack_module(ready, "nodes.trainer")
    folder = tr.checkpoints_folder() / "two_runs"
    for lr in (0.01, 0.02):
        g = graph(steps=2, checkpoint_name="two_runs")
        g["4"]["inputs"].update(save_every=2, learning_rate=lr)
        ex = run_prompt(g)
        assert ex.success, ex.status_messages[-1]
    first = folder / "cat-step000002.pt"
    others = [p for p in folder.parent.glob("two_runs_*") if p.is_dir()]
    assert first.is_file() and len(others) == 1 and (others[0] / "cat-step000002.pt").is_file()
    state_a = torch.load(first, weights_only=True)
    state_b = torch.load(others[0] / "cat-step000002.pt", weights_only=True)
    assert state_a["config"]["lr"] == 0.01 and state_b["config"]["lr"] == 0.02  # neither overwrote the other


def test_a_trigger_on_a_75_token_boundary_pads_to_the_longest_caption_not_420_chunks(ready, tiny_sd15):
    _, clip, _ = tiny_sd15
    CD = pack_module(ready, "nodes.dataset").CatDataset
    L = pack_module(ready, "cat_train.step.conds")
    P = pack_module(ready, "cat_train.data.prompts")
    caption = "a " * (75 * 20 - 1) + "sks dog"  # without the trigger 20 full chunks; the trigger opens the 21st
    y = P.preservation_prompt(caption, ["sks"], "strip", "dog")
    ds = CD([], ("sks",), "dog", clip, "")
    c_tok, c_pres = ds.encode_text([caption]), ds.encode_text([y])
    chunks = (c_tok["context"].shape[1] // 77, c_pres["context"].shape[1] // 77)
    assert chunks == (21, 20), chunks
    both = L.cat_cond(c_tok, c_pres)
    assert both["context"].shape[1] == 21 * 77  # was lcm(21, 20) = 420 chunks
    assert torch.equal(both["context"][0], c_tok["context"][0])


def test_an_sd15_checkpoint_resumed_on_sdxl_names_both_families(ready, tiny_sd15, tiny_sdxl, dataset_dir, tmp_path):
    tr = pack_module(ready, "nodes.trainer")
    A, L, T = (pack_module(ready, f"cat_train.{m}") for m in ("adapters.lora", "training", "training"))
    dsn = pack_module(ready, "nodes.dataset")
    mp, clip, vae = tiny_sd15
    ds = dsn.build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    cfg = T.TrainConfig(steps=1, lr=1e-2, save_every=1, checkpoint_dir=str(tmp_path / "sd15"))
    tr.train_on_model(mp, ds, L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0), cfg)
    xl, xclip, xvae = tiny_sdxl
    ds_xl = dsn.build_dataset(dataset_dir, xvae, xclip, ("sks",), "dog", ".txt", 128, True)
    with pytest.raises(ValueError) as err:
        tr.train_on_model(xl, ds_xl, L.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                          T.TrainConfig(steps=2, lr=1e-2, checkpoint_dir=str(tmp_path / "xl")),
                          resume=str(tmp_path / "sd15" / "cat-step000001.pt"))
    assert "was trained on an SD1.x/SD2 model, this model is SDXL; resume it on the SD1.x/SD2 model it was trained on" in str(err.value)
    assert "target preset" not in str(err.value)
