"""What every node module shares: the category, the pack's own socket types, and small ComfyUI helpers
(IMAGE from a PIL picture, paths under the input folder, the live view's progress events)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

CATEGORY = "CAT (contrastive adapter training)"
Dataset = io.Custom("CAT_DATASET")
LossConfig = io.Custom("CAT_LOSS_CONFIG")
AptOptions = io.Custom("CAT_APT_OPTIONS")
AutoOptions = io.Custom("CAT_AUTO_PRESERVATION")
CatVersion = io.Custom("CATVERSION")
EVENT = "cat.train.progress"  # web/cat_live_view.js listens for it


def image_of(picture) -> torch.Tensor:
    """PIL picture -> ComfyUI IMAGE: (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def input_path(folder: str) -> Path:
    """A folder typed into a node: a full path, or one relative to ComfyUI's input folder."""
    import folder_paths

    p = Path(folder.strip()).expanduser()
    return p if p.is_absolute() else Path(folder_paths.get_input_directory()) / p


def send_event(event: str, data: dict) -> None:
    try:  # `server` is importable only under a running ComfyUI; in-process tests have no PromptServer
        from server import PromptServer
        inst = getattr(PromptServer, "instance", None)
    except Exception:
        inst = None
    if inst is not None:
        inst.send_sync(event, data)


def progress_callback(node_id: str | None, total: int):
    """A training callback(StepInfo) that moves the node's progress bar, feeds the live view and stops at Cancel."""
    import comfy.model_management as mm
    import comfy.utils

    pbar = comfy.utils.ProgressBar(total)
    try:  # events carry their prompt, so two runs on one server (or a queue client) can tell theirs apart
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
        prompt_id = ctx.prompt_id if ctx is not None else None
    except ImportError:
        prompt_id = None

    def cb(info) -> None:
        send_event(EVENT, {"node": node_id, "prompt_id": prompt_id, "step": info.step, "total": info.total, "loss": info.loss, "fit": info.fit,
                           "keep": info.keep, "lr": info.lr, "elapsed": info.elapsed,
                           **info.reports})  # each regularizer's report under its name (APT: per-bin indicator for the live view)
        pbar.update_absolute(info.step, info.total)  # under a server this hook raises when Cancel is pressed
        mm.throw_exception_if_processing_interrupted()  # ...and this catches Cancel when no hook is set
    return cb


MODEL_FILE_INPUTS = ("ckpt_name", "unet_name")  # CheckpointLoaderSimple, UNETLoader (and loaders shaped like them)


def model_file_name(prompt: dict | None, node_id: str | None, input_name: str = "model", hops: int = 32) -> str:
    """The checkpoint file a node's MODEL came from, read off the queued graph: follow the MODEL link upstream
    (through LoRA loaders, ModelSampling and the like, which pass it on as their own `model` input) to the
    loader that names a file. '' where the graph does not say (a MODEL built in code, a loop, a missing node).
    ComfyUI keeps no file name on the MODEL itself; kohya's ss_sd_model_name wants one."""
    node = (prompt or {}).get(str(node_id)) if node_id is not None else None
    for _ in range(hops):
        if not isinstance(node, dict):
            return ""
        inputs = node.get("inputs", {})
        named = next((inputs[k] for k in MODEL_FILE_INPUTS if isinstance(inputs.get(k), str)), None)
        if named is not None:
            return named
        link = inputs.get(input_name)
        if not (isinstance(link, list) and len(link) == 2):
            return ""
        node, input_name = prompt.get(str(link[0])), "model"
    return ""
