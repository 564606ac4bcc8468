"""The CAT Training Options node's caption and timestep widgets, through ComfyUI's own validator and executor:
they reach TrainConfig / CatLossConfig (the run's recorded settings and the LoRA header say so) and the run trains."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from conftest import run_prompt
from test_bad_inputs import graph

OPTIONS = {"caption_dropout": 0.5, "shuffle_tags": True, "keep_tags": 1, "caption_variants": 2, "timestep_min": 100,
           "timestep_max": 900, "min_snr_gamma": 5.0}


def test_widgets_are_the_option_fields_in_order(comfy):
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS["CAT_TrainingOptions"].INPUT_TYPES()["optional"]
    assert [n for n in spec if n in OPTIONS] == list(OPTIONS)  # in this order, among the other features' widgets
    assert spec["caption_dropout"][1]["max"] == 0.99 and spec["timestep_max"][1]["default"] == 1000
    assert spec["min_snr_gamma"][1]["default"] == 0.0 and spec["shuffle_tags"][0] == "BOOLEAN"


def test_options_reach_the_trainer_and_it_trains(comfy, test_checkpoint_node, dataset_dir):
    from safetensors import safe_open

    g = graph(checkpoint_name="training_options", save_name="training_options")
    g["6"] = {"class_type": "CAT_TrainingOptions", "inputs": dict(OPTIONS)}
    g["4"]["inputs"]["options"] = ["6", 0]
    g["4"]["inputs"]["save_every"] = 2  # a run folder is kept only when the run writes in it
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

@dataclasses.dataclass
class _Toy:
    count: int = dataclasses.field(default=3, metadata={"help": "a count.", "min": 1, "max": 9})
    rate: float = dataclasses.field(default=0.25, metadata={"help": "a rate.", "max": 1.0, "step": 0.05})
    on: bool = dataclasses.field(default=False, metadata={"help": "a switch."})
    kind: Literal["a", "b"] = dataclasses.field(default="b", metadata={"help": "a choice."})
    text: str = dataclasses.field(default="x", metadata={"help": "a text."})


def test_widgets_are_built_from_the_fields(comfy):
    from conftest import pack_module

    mod = pack_module(comfy, "nodes.training_options")
    w = {n: mod.widget(_Toy, n) for n in ("count", "rate", "on", "kind", "text")}
    assert (w["count"].default, w["count"].min, w["count"].max, w["count"].tooltip) == (3, 1, 9, "a count.")
    assert (w["rate"].default, w["rate"].min, w["rate"].max, w["rate"].step) == (0.25, 0.0, 1.0, 0.05)
    assert w["on"].default is False and w["on"].get_io_type() == "BOOLEAN"
    assert (w["kind"].options, w["kind"].default) == (["a", "b"], "b")
    assert w["text"].default == "x" and all(i.optional for i in w.values())


def test_every_widget_defaults_to_its_option_and_reaches_its_class(comfy, monkeypatch):
    """Unconnected and connected-with-defaults must train the same run: each widget's default is its field's default,
    and the node's output hands each value to the class that owns it."""
    from conftest import pack_module

    mod = pack_module(comfy, "nodes.training_options")
    assert mod.GROUPS, "no option is on the CAT Training Options node"
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_TrainingOptions"]
    inputs = {i.id: i for i in node.define_schema().inputs}
    assert list(inputs) == [n for _, names in mod.GROUPS for n in names]
    values = {}
    for cls, names in mod.GROUPS:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for n in names:
            f = fields[n]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert inputs[n].default == default, f"{cls.__name__}.{n}"
            values[n] = default
    out = node.execute(**values).result[0]
    expected: dict[str, set] = {}
    for cls, names in mod.GROUPS:
        expected.setdefault(cls.__name__, set()).update(names)
    assert {c: set(v) for c, v in out.items()} == expected
    for cls, names in mod.GROUPS:
        assert dataclasses.replace(cls(), **mod.options_for(out, cls)) == cls()
