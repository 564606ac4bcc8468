"""The CAT Training Options node's caption and timestep widgets, through ComfyUI's own validator and executor:
they reach TrainConfig / CatLossConfig (the run's recorded settings and the LoRA header say so) and the run trains."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_prompt
from test_bad_inputs import graph

OPTIONS = {"caption_dropout": 0.5, "shuffle_tags": True, "keep_tags": 1, "caption_variants": 2, "timestep_min": 100,
           "timestep_max": 900, "min_snr_gamma": 5.0}


def test_widgets_are_the_option_fields_in_order(comfy):
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS["CAT_TrainingOptions"].INPUT_TYPES()["optional"]
    assert list(spec)[:7] == list(OPTIONS)  # other issue-20 features append their own widgets after these
    assert spec["caption_dropout"][1]["max"] == 0.99 and spec["timestep_max"][1]["default"] == 1000
    assert spec["min_snr_gamma"][1]["default"] == 0.0 and spec["shuffle_tags"][0] == "BOOLEAN"


def test_options_reach_the_trainer_and_it_trains(comfy, test_checkpoint_node, dataset_dir):
    from safetensors import safe_open

    g = graph(checkpoint_name="training_options", save_name="training_options")
    g["6"] = {"class_type": "CAT_TrainingOptions", "inputs": dict(OPTIONS)}
    g["4"]["inputs"]["options"] = ["6", 0]
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    assert "2/2 steps" in out["4"]["text"][0]
    with safe_open(out["5"]["text"][0], "pt") as f:
        meta = f.metadata()
    assert (meta["ss_caption_dropout_rate"], meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("0.5", "True", "1")
    assert (meta["ss_min_snr_gamma"], meta["cat_timestep_min"], meta["cat_timestep_max"]) == ("5", "100", "900")
    run = Path(comfy.folder_paths.get_output_directory()) / "cat_checkpoints" / "training_options"
    recorded = json.loads(next(run.parent.glob("training_options*/cat-run.json")).read_text())["settings"]
    assert recorded["config"]["caption_dropout"] == "0.5" and recorded["config"]["shuffle_tags"] is True
    assert recorded["config"]["timestep_min"] == 100 and recorded["loss"]["min_snr_gamma"] == "5.0"


def test_unconnected_options_write_defaults_in_the_header(comfy, test_checkpoint_node, dataset_dir):
    from safetensors import safe_open

    ex = run_prompt(graph(checkpoint_name="training_options_off", save_name="training_options_off"))
    assert ex.success, ex.status_messages[-1]
    with safe_open(ex.history_result["outputs"]["5"]["text"][0], "pt") as f:
        meta = f.metadata()
    assert (meta["ss_caption_dropout_rate"], meta["ss_shuffle_caption"], meta["ss_min_snr_gamma"]) == ("0.0", "False", "None")
