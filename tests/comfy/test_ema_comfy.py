"""EMA through ComfyUI's executor: the CAT Training Options node's ema widgets reach the saved LoRA files."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import run_prompt
from test_bad_inputs import graph


@pytest.fixture
def ready(comfy, test_checkpoint_node, dataset_dir):
    return comfy


def _lora_file(path: Path) -> tuple[set[bytes], dict]:
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).numpy().tobytes() for k in f.keys() if k.endswith("_down.weight") or k.endswith("_up.weight")}, f.metadata()


def _as_bytes(tensors) -> set[bytes]:
    return {t.float().numpy().tobytes() for t in tensors}


@pytest.mark.parametrize("decay", [0.5, 0.0])
def test_options_node_ema_reaches_the_saved_loras(ready, decay):
    name = f"ema_{uuid.uuid4().hex[:8]}"
    g = graph(steps=4, checkpoint_name=name, save_name=name)
    g["4"]["inputs"].update(save_every=2, learning_rate=0.05)
    g["6"] = {"class_type": "CAT_TrainingOptions", "inputs": {"ema_decay": decay, "ema_start_step": 1}}
    g["4"]["inputs"]["options"] = ["6", 0]
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    loras = Path(ready.folder_paths.get_folder_paths("loras")[0])
    ckpts = Path(ready.folder_paths.get_output_directory()) / "cat_checkpoints" / name
    for step, path in ((2, loras / f"{name}_step000002.safetensors"), (4, loras / f"{name}.safetensors")):
        state = torch.load(ckpts / f"cat-step{step:06d}.pt", weights_only=True)
        trained = _as_bytes(t for w in state["lora"].values() for t in (w["down"], w["up"]))
        saved, meta = _lora_file(path)
        assert meta["cat_ema_decay"] == str(decay) and meta["cat_ema_start_step"] == "1", meta
        if decay:
            assert saved == _as_bytes(state["ema"]["shadow"]), step  # the file is the average...
            assert saved != trained, step                             # ...not the trained weights
        else:
            assert "ema" not in state and saved == trained, step
