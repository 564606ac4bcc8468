"""Issue 32, losses on the node side: two runs with one checkpoint_name keep their own step LoRAs, masks that cannot be
read lose no image, leftovers of a killed save are cleaned."""
from __future__ import annotations

import pytest
from safetensors import safe_open

from conftest import pack_module, run_prompt
from test_bad_inputs import graph


@pytest.fixture
def ready(comfy, test_checkpoint_node, dataset_dir):
    return comfy


def test_two_runs_with_one_checkpoint_name_write_their_own_step_loras(ready):
    """Two servers sharing an output folder ran `dup` with save_every 2: both wrote dup_step000002 and
    dup_step000004, and run A stopped at step 4 ("appeared while saving; pass overwrite=True"), losing its LoRA."""
    loras = pack_module(ready, "nodes.save_lora").loras_folder()
    from pathlib import Path

    for lr in (0.01, 0.02):
        g = graph(steps=4, checkpoint_name="dup_steps", save_name=f"dup_final_{lr}")
        g["4"]["inputs"].update(save_every=2, learning_rate=lr)
        ex = run_prompt(g)
        assert ex.success, ex.status_messages[-1]
    names = sorted(p.name for p in Path(loras).glob("dup_steps*.safetensors"))
    run_b = [p.name for p in (Path(loras).parent / "output" / "cat_checkpoints").glob("dup_steps_*")]
    assert len(run_b) == 1, run_b
    # run A owns the folder `dup_steps`, run B got `dup_steps_<run id>`: its step LoRAs carry the same name
    assert names == sorted(["dup_steps_step000002.safetensors", "dup_steps_step000004.safetensors",
                            f"{run_b[0]}_step000002.safetensors", f"{run_b[0]}_step000004.safetensors"]), names
    for n in names:
        with safe_open(str(Path(loras) / n), "pt") as f:
            lr = f.metadata()["ss_learning_rate"]
        assert lr == ("0.02" if n.startswith(run_b[0]) else "0.01"), (n, lr)
    assert (Path(loras) / "dup_final_0.01.safetensors").is_file() and (Path(loras) / "dup_final_0.02.safetensors").is_file()


def test_a_second_run_with_one_checkpoint_name_keeps_its_validation_in_its_own_folder(ready):
    """The watch took its folder before train() moved the second run to its own: run B's step-0 validation row
    truncated run A's validation.csv, and its rows went on in A's file."""
    import csv
    from pathlib import Path

    root = Path(pack_module(ready, "nodes.save_lora").loras_folder()).parent / "output" / "cat_checkpoints"
    for lr in (0.01, 0.02):
        g = graph(steps=4, checkpoint_name="dup_watch", save_name=f"dup_watch_{lr}")
        g["4"]["inputs"].update(learning_rate=lr, validate_every=2)
        ex = run_prompt(g)
        assert ex.success, ex.status_messages[-1]
        if lr == 0.01:
            first = (root / "dup_watch" / "validation.csv").read_bytes()
    moved = [p for p in root.glob("dup_watch_*") if p.is_dir()]
    assert len(moved) == 1, moved
    assert (root / "dup_watch" / "validation.csv").read_bytes() == first  # run A's file as A left it
    steps = [int(r["step"]) for r in csv.DictReader((moved[0] / "validation.csv").open())]
    assert steps == [0, 2, 4], steps  # run B's rows, step 0 included, in B's own folder


def test_a_step_lora_name_taken_while_saving_goes_to_the_next_free_name(ready, tiny_sd15, dataset_dir, tmp_path,
                                                                         monkeypatch):
    """The other server wrote the same name between this writer's look and its write (same settings, same folder)."""
    tr, sv = pack_module(ready, "nodes.trainer"), pack_module(ready, "nodes.save_lora")
    A, T = pack_module(ready, "cat_train.adapters.lora"), pack_module(ready, "cat_train.training")
    mp, clip, vae = tiny_sd15
    ds = pack_module(ready, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    loss, spec = T.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0)
    cfg = T.TrainConfig(steps=2, lr=1e-2, save_every=2, checkpoint_dir=str(tmp_path / "ck"))
    loras = tmp_path / "loras"
    loras.mkdir()
    real, raced = sv.safe_lora_path, []

    def racing(folder, name):
        path = real(folder, name)
        if not raced:
            raced.append(path)
            path.write_bytes(b"the other server's file")  # appears after the look, before the write
        return path
    monkeypatch.setattr(sv, "safe_lora_path", racing)
    writer = sv.step_lora_writer(mp, str(loras), "race", loss, spec, cfg, ds)
    result = tr.train_on_model(mp, ds, loss, spec, cfg, on_save=writer)[4]
    assert result.steps_done == 2
    assert (loras / "race_step000002.safetensors").read_bytes() == b"the other server's file"
    with safe_open(str(loras / "race_step000002_00001.safetensors"), "pt") as f:
        assert f.metadata()["ss_output_name"] == "race_step000002" and len(list(f.keys())) > 0


@pytest.mark.parametrize("floor", [1.0, 0.1])
def test_a_wrong_sized_mask_loses_no_image_and_masked_training_names_it(comfy, test_checkpoint_node, tiny_sd15, floor):
    """A -masklabel.png of another size dropped its image ("skipped 1 unreadable ... file(s)") even with masked
    training off: off, the image trains (3 images in the LoRA) and the info names the mask; on, the run is refused
    before any model work, naming the mask file and the fix."""
    from pathlib import Path

    from PIL import Image
    from safetensors import safe_open
    from test_masks_comfy import graph as masked_graph
    from test_masks_comfy import masked_folder

    name = f"cat_bad_mask_{floor}".replace(".", "_")
    root = masked_folder(Path(comfy.folder_paths.get_input_directory()) / name)
    Image.new("L", (64, 64), 255).save(root / "b-masklabel.png")  # b.png is 128x128
    ex = run_prompt(masked_graph(name, floor, 0.0))
    if floor == 1.0:
        assert ex.success, ex.status_messages[-1]
        out = ex.history_result["outputs"]
        with safe_open(out["5"]["text"][0], "pt") as f:
            assert f.metadata()["ss_num_train_images"] == "3"
        _, clip, vae = tiny_sd15
        nd = pack_module(comfy, "nodes.dataset")
        text = nd.info(nd.build_dataset(root, vae, clip, ("sks",), "dog", ".txt", 128, True))
        assert text.startswith("3 images") and "unreadable" not in text, text
        assert f"mask {root / 'b-masklabel.png'} is 64x64 but its image b.png is 128x128" in text, text
    else:
        assert not ex.success
        msg = ex.status_messages[-1][1]["exception_message"]
        assert msg.startswith("masked training is on (mask_floor 0.1, mask_keep 0.0) but 1 mask file(s) cannot be "
                              f"used: mask {root / 'b-masklabel.png'} is 64x64"), msg



def test_cancel_during_a_preview_round_answers_within_a_second(comfy, tiny_sd15, dataset_dir, tmp_path):
    """Cancel (ComfyUI's interrupt flag) pressed while the trainer draws a preview round of 30 prompts stops the run
    within a sampling step, not after the round (18 s on a GPU at 30 prompts). ComfyUI 0.33's own layers check the
    flag at every op (comfy.ops.run_every_op); 0.3.64's do not, so there only the pack's cancel points answer."""
    import time

    import comfy.model_management as mm

    tr, A, T = pack_module(comfy, "nodes.trainer"), pack_module(comfy, "cat_train.adapters.lora"), pack_module(
        comfy, "cat_train.training")
    mp, clip, vae = tiny_sd15
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    unet = mp.model.diffusion_model
    seen = {"rows": 0, "pressed": None}

    def slow(module, args):  # a real model's pace: 10 ms a row; Cancel pressed 40 rows into the first preview round
        if not module.training:
            time.sleep(0.01 * len(args[0]))
            seen["rows"] += len(args[0])
            if seen["rows"] >= 40 and seen["pressed"] is None:
                seen["pressed"] = time.perf_counter()
                mm.interrupt_current_processing(True)
    hook = unet.register_forward_pre_hook(slow)
    prompts = " | ".join(f"a photo of sks dog number {i}" for i in range(30))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            tr.train_on_model(mp, ds, T.CatLossConfig(1.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0),
                              T.TrainConfig(steps=2, lr=1e-2, checkpoint_dir=str(tmp_path / "ck")), "9",
                              watch=dict(vae=vae, preview_every=1, prompts=prompts))
        waited = time.perf_counter() - seen["pressed"]
    finally:
        hook.remove()
        mm.interrupt_current_processing(False)
    # the base round draws the 30 plain twins: 30 prompts x 20 steps x 2 (guidance) rows = 12 s at 10 ms a row
    assert waited < 1.0, f"Cancel answered after {waited:.2f} s ({seen['rows']} rows drawn)"


def test_after_cancel_the_node_sends_the_resume_from_and_the_file_name_alone_resumes(comfy, tiny_sd15, dataset_dir,
                                                                                     monkeypatch, tmp_path):
    """Cancel used to leave only a log line with the checkpoint; resume_from took `<checkpoint_name>/cat-stepNNNNNN.pt`
    only. Now the node sends what to type, and the file name alone finds the one run folder holding it."""
    import comfy.model_management as mm

    tr, A, T = pack_module(comfy, "nodes.trainer"), pack_module(comfy, "cat_train.adapters.lora"), pack_module(
        comfy, "cat_train.training")
    mp, clip, vae = tiny_sd15
    ds = pack_module(comfy, "nodes.dataset").build_dataset(dataset_dir, vae, clip, ("sks",), "dog", ".txt", 128, True)
    sent = []
    monkeypatch.setattr(tr, "send_event", lambda event, data: sent.append((event, data)))
    root = tmp_path / "cat_checkpoints"  # its own output/cat_checkpoints: other tests' run folders hold step 2 too
    monkeypatch.setattr(tr, "checkpoints_folder", lambda: root)
    name = "cancel_resume_from"
    cfg = T.TrainConfig(steps=6, lr=1e-2, seed=11, checkpoint_dir=str(root / name))
    forwards = [0]

    def press_cancel(module, args):  # in the third step's forward: the loop saves step 2 and stops
        if module.training:
            forwards[0] += 1
            if forwards[0] == 3:
                mm.interrupt_current_processing(True)
    hook = mp.model.diffusion_model.register_forward_pre_hook(press_cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            tr.train_on_model(mp, ds, T.CatLossConfig(0.0, "class", "dog"), A.LoraSpec(rank=2, alpha=2.0), cfg, "9")
    finally:
        hook.remove()
        mm.interrupt_current_processing(False)
    stopped = [d for e, d in sent if e == "cat.train.stopped"]
    assert len(stopped) == 1 and stopped[0]["node"] == "9", sent
    typed = stopped[0]["resume_from"]
    assert typed.startswith(f"{name}/cat-step00000") and typed.endswith(".pt"), typed
    file_name = typed.split("/")[1]
    assert tr.resume_path(typed) == tr.resume_path(file_name) == str(tr.checkpoints_folder() / typed)
    other = tr.checkpoints_folder() / f"{name}_copy" / file_name
    other.parent.mkdir()
    other.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        tr.resume_path(file_name)
    assert str(err.value) == (f"resume_from {file_name!r} is in 2 run folders ({typed}, {name}_copy/{file_name}); give "
                              f"the folder too, e.g. resume_from {typed}.")


def test_previews_off_save_no_grey_picture(comfy, test_checkpoint_node, dataset_dir):
    """The shipped graphs save the trainer's previews with Save Image: with preview_every 0 a grey 64 px PNG was
    written on every run. Now the previews (and an empty step chart) block what they feed, silently; the run and its
    LoRA are as before."""
    from pathlib import Path

    g = graph(steps=2, checkpoint_name="previews_off", save_name="previews_off")
    g["6"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 4], "filename_prefix": "previews_off_grid"}}
    g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 5], "filename_prefix": "previews_off_chart"}}
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    assert Path(out["5"]["text"][0]).is_file()  # the LoRA is saved
    saved = sorted(p.name for p in Path(comfy.folder_paths.get_output_directory()).glob("previews_off_*"))
    assert saved == [], saved
    assert "6" not in out and "7" not in out


def test_steps_png_draws_the_measured_values(comfy, monkeypatch):
    """steps.png: the per-saved-step chart draws the values (smooth=False), so its legend names the last measured
    IS and KPS, not an EMA of three points."""
    plot = pack_module(comfy, "cat_train.measure.plot")
    watch = pack_module(comfy, "nodes.watch")
    seen = {}
    real = plot.loss_curve

    def spy(*a, **k):
        img = real(*a, **k)
        seen.update(img.info["legend"])
        return img
    monkeypatch.setattr(plot, "loss_curve", spy)
    rows = [{"step": 2, "IS": 0.2, "KPS": 0.9, "keep_drift": 0.01, "fit": 0.1},
            {"step": 4, "IS": 0.6, "KPS": 0.7, "keep_drift": 0.02, "fit": 0.05}]
    assert watch.step_chart(rows) is not None
    assert seen == {"IS": 0.6, "KPS": 0.7, "keep_drift": 0.02, "fit": 0.05}
