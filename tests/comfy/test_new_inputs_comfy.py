"""Issue 32, the new features' inputs through ComfyUI: each refused before any model work (or warned where the user
looks) with the input and the fix named."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from conftest import run_prompt
from test_bad_inputs import _defaults, graph


@pytest.fixture
def ready(comfy, test_checkpoint_node, dataset_dir):
    return comfy


def failure(ex) -> tuple[str, str]:
    """The executor's error (type, message) of a failed run."""
    assert not ex.success
    data = next(d for kind, d in ex.status_messages if kind == "execution_error")
    return data["exception_type"], data["exception_message"]


def test_training_options_wired_into_the_catversion_trainer_are_named(ready):
    """Issue 32: `TypeError: CatVersionTrainerNode.execute() got an unexpected keyword argument 'options'`."""
    g = {"1": {"class_type": "CATTest_TinyCheckpoint", "inputs": {"kind": "sd15"}},
         "2": graph()["2"],
         "6": {"class_type": "CAT_TrainingOptions", "inputs": {"ema_decay": 0.5}},
         "7": {"class_type": "CAT_CatVersionTrainer", "inputs": {
             **_defaults("CAT_CatVersionTrainer"), "model": ["1", 0], "clip": ["1", 1], "dataset": ["2", 0],
             "steps": 2, "class_word": "dog", "options": ["6", 0]}},
         "8": {"class_type": "CAT_SaveCatVersion", "inputs": {"catversion": ["7", 1], "name": "cv_options"}}}
    ex = run_prompt(g)
    kind, message = failure(ex)
    assert kind == "ValueError" and message.startswith(
        "CatVersion Trainer has no input options: remove that link. CAT Training Options is for the CAT LoRA Trainer; "
        "CatVersion's settings are this node's own widgets."), (kind, message)


def vision_node(comfy, name: str, model) -> str:
    """A loader node returning `model` as CLIP_VISION, as Load CLIP Vision does."""
    class Loader:
        RETURN_TYPES, FUNCTION, CATEGORY = ("CLIP_VISION",), "load", "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def load(self):
            return (model,)
    comfy.nodes.NODE_CLASS_MAPPINGS[name] = Loader
    return name


def tiny_vision(comfy, tmp_path, model_type: str):
    """comfy.clip_vision.ClipVisionModel, 2 layers of width 32: CLIP (a projection to 24) or SigLIP (none: its
    `image_embeds` are the patch tokens, (B, 4, 32) here). Weights seeded: ComfyUI's ops leave them uninitialised."""
    import comfy.clip_vision

    cfg = {"num_channels": 3, "hidden_size": 32, "image_size": 32, "intermediate_size": 64, "model_type": model_type,
           "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 16, "layer_norm_eps": 1e-05}
    cfg.update({"hidden_act": "gelu_pytorch_tanh", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
               if model_type.startswith("siglip") else {"hidden_act": "quick_gelu", "projection_dim": 24})
    path = tmp_path / f"{model_type}.json"
    path.write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cv.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cv


def checkpoints(comfy, name: str) -> list:
    from pathlib import Path

    return sorted((Path(comfy.folder_paths.get_output_directory()) / "cat_checkpoints").glob(f"{name}*"))


def test_a_siglip_clip_vision_is_refused_before_step_1(ready, tmp_path):
    """Issue 32: a SigLIP-type model trained, then failed on a shape at the first saved step's scores."""
    g = graph(checkpoint_name="siglip_scores", save_name="siglip_scores")
    g["9"] = {"class_type": vision_node(ready, "CATTest_TinySiglip", tiny_vision(ready, tmp_path,
                                                                                "siglip_vision_model")), "inputs": {}}
    g["4"]["inputs"].update(clip_vision=["9", 0], vae=["1", 2], save_every=1)
    kind, message = failure(run_prompt(g))
    assert kind == "ValueError" and message.startswith(
        "the clip_vision model (siglip_vision_model) gives no single embedding per image (image_embeds 1x4x32): "
        "SigLIP-type vision models have no projection to one"), (kind, message)
    assert checkpoints(ready, "siglip_scores") == []  # refused before the run's folder, before step 1


def test_clip_vision_without_saved_steps_is_refused(ready, tmp_path):
    g = graph(checkpoint_name="clip_vision_unsaved", save_name="clip_vision_unsaved")
    g["9"] = {"class_type": vision_node(ready, "CATTest_TinyClipVision", tiny_vision(ready, tmp_path,
                                                                                    "clip_vision_model")), "inputs": {}}
    g["4"]["inputs"].update(clip_vision=["9", 0], vae=["1", 2], save_every=0)
    kind, message = failure(run_prompt(g))
    assert (kind, message.strip()) == ("ValueError", "clip_vision scores the previews of every saved step (IS, KPS, "
                                       "the best step), and save_every is 0, so no step would be scored: set "
                                       "save_every (e.g. steps / 6), or disconnect clip_vision."), message
    assert checkpoints(ready, "clip_vision_unsaved") == []
    g["4"]["inputs"].update(save_every=2, checkpoint_name="clip_vision_saved")  # a CLIP model scores as before
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    assert "IS" in ex.history_result["outputs"]["4"]["text"][0]


@pytest.mark.parametrize("case, options, trainer, message", [
    ("ema", {"ema_decay": 0.9999}, {"steps": 100},
     "ema_decay 0.9999 over 100 averaged steps (steps 100, ema_start_step 0) averages about 10000 steps"),
    ("ema_start", {"ema_decay": 0.9, "ema_start_step": 5}, {"steps": 5},
     "ema_start_step 5 is at or past the last step (5)"),
    ("keep_every", {}, {"steps": 50}, "keep_every 50 with 50 steps puts the CAT term on step 1 only"),
    ("probe", {}, {"probe_prompts": "a photo of a cat | a photo of sks dog"},
     "probe_prompts entry 'a photo of sks dog' holds the trigger 'sks'"),
])
def test_settings_that_waste_the_run_are_refused_before_any_model_work(ready, case, options, trainer, message):
    g = graph(checkpoint_name=f"refused_{case}", save_name=f"refused_{case}")
    g["6"] = {"class_type": "CAT_TrainingOptions", "inputs": options}
    g["4"]["inputs"].update(options=["6", 0], **trainer)
    if case == "keep_every":
        g["3"]["inputs"]["keep_every"] = 50  # CAT Loss Config's
    kind, text = failure(run_prompt(g))
    assert kind == "ValueError" and message in text, text
    assert checkpoints(ready, f"refused_{case}") == []


def test_warnings_reach_the_browser_before_step_1_and_the_summary(ready, monkeypatch):
    import server

    sent = []

    class Instance:
        client_id = "me"

        def send_sync(self, event, data, sid=None):
            sent.append((event, data, sid))
    monkeypatch.setattr(server.PromptServer, "instance", Instance(), raising=False)
    g = graph(checkpoint_name="warned_early", save_name="warned_early")
    g["6"] = {"class_type": "CAT_TrainingOptions", "inputs": {"keep_tags": 1}}
    g["4"]["inputs"]["options"] = ["6", 0]
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    toasts = [(d, sid) for e, d, sid in sent if e == "cat.warning"]
    assert toasts[0][1] == "me" and toasts[0][0]["title"] == "Training settings"
    assert toasts[0][0].get("prompt_id") in ("t", None)  # the running prompt's id where ComfyUI gives one (0.33)
    assert toasts[0][0]["warnings"][0].startswith("keep_tags 1 does nothing while shuffle_tags is off")
    first_step = next(i for i, (e, d, _) in enumerate(sent) if e == "cat.train.progress")
    assert sent.index(next(x for x in sent if x[0] == "cat.warning")) < first_step
    assert "\nwarning: keep_tags 1 does nothing" in ex.history_result["outputs"]["4"]["text"][0]


def test_the_dataset_info_says_why_a_huge_png_was_skipped(ready, tiny_sd15, tmp_path, monkeypatch):
    from PIL import Image

    from conftest import pack_module

    Image.new("RGB", (128, 128), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (300, 300), (10, 200, 10)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 90,000 px is over 2x: as 14000x14000 is over 2 x 89 MP
    _, clip, vae = tiny_sd15
    ds_node = pack_module(ready, "nodes.dataset")
    text = ds_node.info(ds_node.build_dataset(tmp_path, vae, clip, ("sks",), "dog", ".txt", 128, True))
    assert f"skipped 1 file(s):\n- image {tmp_path / 'huge.png'} is too large to decode safely" in text, text
    assert "downscale it (e.g. to 4096 px on the long side" in text, text


@pytest.mark.parametrize("node, inputs, named", [
    ("CAT_TrainingOptions", {"mask_floor": 2.0, "ema_decay": 0.5}, ["mask_floor"]),
    ("CAT_TrainingOptions", {"algorithm": "oft", "ema_decay": 0.5}, ["algorithm"]),
    ("CAT_AptOptions", {"adaptive": 1.0, "stabilize": 5.0, "align": 1000.0, "bins": 1_000_000, "augment": "flip"},
     ["bins"]),
    # a pattern is the pack's own check: ComfyUI files it under each input its validate_inputs takes that the graph
    # gives (augment, the two patterns), not under all twelve; the message names the field
    ("CAT_AptOptions", {"adaptive": 1.0, "stabilize": 5.0, "align": 1000.0, "bins": 10, "augment": "flip",
                        "stabilize_layers": "((("}, ["augment", "stabilize_layers"]),
])
def test_a_bad_value_is_reported_once_under_its_own_input(ready, node, inputs, named):
    """Issue 32: a validate_inputs taking **kw made ComfyUI file its one message under every input given (20 lines
    for one wrong value in CAT Training Options)."""
    import execution

    g = graph()
    g["6"] = {"class_type": node, "inputs": inputs}
    if node == "CAT_AptOptions":
        g["3"]["inputs"]["apt"] = ["6", 0]
    else:
        g["4"]["inputs"]["options"] = ["6", 0]
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("v", g, None))
    assert not ok
    errors = node_errors["6"]["errors"]
    assert sorted(e["extra_info"]["input_name"] for e in errors) == named, errors


@pytest.mark.parametrize("node, inputs, message", [
    ("CAT_TrainingOptions", {"mask_floor": float("nan")}, "CAT Training Options: mask_floor must be a finite number"),
    ("CAT_AptOptions", {"adaptive": float("nan"), "stabilize": 5.0, "align": 1000.0, "bins": 10, "augment": "flip"},
     "APT Options: adaptive must be a finite number"),
])
def test_nan_that_comfyuis_range_check_lets_through_is_refused(ready, node, inputs, message):
    g = graph(checkpoint_name="nan_option")
    g["6"] = {"class_type": node, "inputs": inputs}
    if node == "CAT_AptOptions":
        g["3"]["inputs"]["apt"] = ["6", 0]
    else:
        g["4"]["inputs"]["options"] = ["6", 0]
    kind, text = failure(run_prompt(g))
    assert kind == "ValueError" and text.startswith(message), text


def test_a_storage_error_reads_as_the_pack_and_its_message(ready):
    """Issue 32 (left in round two's queue rows): ComfyUI's dialog showed '<custom_nodes path>.cat_train.adapters.
    export.StorageError: [Errno 17] checkpoint folder …'."""
    from pathlib import Path

    blocked = Path(ready.folder_paths.get_output_directory()) / "cat_checkpoints" / "dialog_blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the run's folder would go")
    kind, text = failure(run_prompt(graph(checkpoint_name="dialog_blocked", save_name="dialog_blocked")))
    assert kind == "ComfyUI-CAT.StorageError", kind
    assert text.startswith(f"checkpoint folder {blocked} cannot be written"), text
