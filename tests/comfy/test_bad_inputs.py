"""Bad inputs through ComfyUI's own validator and executor: refused before any training, with the field
and the fix named (issue 12's 'Bad inputs' list, node side)."""
from __future__ import annotations

import asyncio
import time

import pytest

from conftest import run_prompt


def _defaults(class_type: str) -> dict:
    """Every widget input at its schema default, so the graph keeps validating as the trainer gains options."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = {}
    for name, (typ, *opt) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        extra = opt[0] if opt and isinstance(opt[0], dict) else {}
        if "default" in extra:
            out[name] = extra["default"]
        elif isinstance(typ, list) and typ:
            out[name] = typ[0]
    return out


def graph(**over) -> dict:
    """Tiny SD1.x -> CAT Dataset (input/cat_test_ds) -> loss config -> trainer -> Save CAT LoRA."""
    v = {"triggers": "sks", "ds_class": "dog", "token_weights": "", "loss_class": "dog", "checkpoint_name": "bad_inputs",
         "save_name": "bad_inputs", "steps": 2, **over}
    return {
        "1": {"class_type": "CATTest_TinyCheckpoint", "inputs": {"kind": "sd15"}},
        "2": {"class_type": "CAT_Dataset", "inputs": {"vae": ["1", 2], "clip": ["1", 1], "folder": "cat_test_ds",
                                                      "triggers": v["triggers"], "class_word": v["ds_class"],
                                                      "caption_extension": ".txt", "resolution": 128, "buckets": True}},
        "3": {"class_type": "CAT_LossConfig", "inputs": {"cat_factor": 1.0, "preservation": "class", "class_word": v["loss_class"],
                                                         "token_weights": v["token_weights"]}},
        "4": {"class_type": "CAT_LoraTrainer", "inputs": {**_defaults("CAT_LoraTrainer"),
            "model": ["1", 0], "dataset": ["2", 0], "loss_config": ["3", 0], "rank": 2, "lora_alpha": 2.0,
            "steps": v["steps"], "learning_rate": 0.01, "save_every": 0, "checkpoint_name": v["checkpoint_name"],
            "resume_from": ""}},
        "5": {"class_type": "CAT_SaveLora", "inputs": {"lora": ["4", 1], "name": v["save_name"]}},
    }


@pytest.fixture
def ready(comfy, test_checkpoint_node, dataset_dir):
    return comfy


def test_bad_names_fail_validation_before_anything_runs(ready):
    import execution

    ok, err, _, node_errors = asyncio.run(execution.validate_prompt(
        "v", graph(save_name="../escape", checkpoint_name="/etc/cat"), None))
    assert not ok
    details = {nid: [e["details"] for e in ne["errors"]] for nid, ne in node_errors.items()}
    assert any("LoRA name '../escape' names a path outside the loras folder" in d for d in details["5"]), details
    assert any("checkpoint_name '/etc/cat' names a path outside output/cat_checkpoints; use a plain name such as "
               "'cat_run'" in d for d in details["4"]), details
    assert not any("LoRA name" in d for d in details["4"])  # the trainer's field is named, not the save node's
    ok, *_ = asyncio.run(execution.validate_prompt("v", graph(), None))
    assert ok


def _failure(g) -> str:
    ex = run_prompt(g)
    assert not ex.success
    name, data = ex.status_messages[-1]
    assert name == "execution_error"
    return f"node {data['node_id']} ({data['node_type']}): {data['exception_message']}"


@pytest.mark.parametrize("over, message", [
    ({"token_weights": "sks=abc"}, "node 3 (CAT_LossConfig): token_weights line 1 ('sks=abc'): weight 'abc' is not a number; "
                                   "one 'token=weight' per line"),
    ({"token_weights": "sks=1\nzwx=2"}, "node 4 (CAT_LoraTrainer): token_weights names 'zwx', which is not a trigger of "
                                        "the dataset (triggers: sks)"),
    ({"triggers": "toy", "ds_class": "toy", "loss_class": "toy"}, "node 2 (CAT_Dataset): trigger 'toy' is the same word as "
                                                                   "class_word 'toy'"),
    ({"triggers": "toy", "ds_class": "", "loss_class": "toy"}, "node 4 (CAT_LoraTrainer): "),
])
def test_bad_concepts_fail_before_training(ready, over, message):
    t0 = time.monotonic()
    text = _failure(graph(steps=100000, **over))  # would run for hours if training started
    assert message in text, text
    assert time.monotonic() - t0 < 60
    if over.get("ds_class") == "":  # trigger 'toy' with loss class word 'toy': y would equal y_T
        assert "y_T" in text or "the trigger itself" in text, text
