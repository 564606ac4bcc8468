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
TrainingOptions = io.Custom("CAT_TRAINING_OPTIONS")
EVENT = "cat.train.progress"  # web/cat_live_view.js listens for it
STOPPED_EVENT = "cat.train.stopped"  # a run stopped with a checkpoint saved: the live view shows its resume_from
PREVIEW_MAX = 768  # px: a preview grid shown on the node is scaled down to this


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


def progress_callback(node_id: str | None, total: int, preview=None):
    """A training callback(StepInfo) that moves the node's progress bar, feeds the live view and stops at Cancel.
    preview: () -> a PIL image or None; a new image is shown on the node (ComfyUI's progress preview)."""
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
        # each term's report under its name (APT: the per-bin indicator for the live view)
        send_event(EVENT, {"node": node_id, "prompt_id": prompt_id, "step": info.step, "total": info.total,
                           "loss": info.loss, "fit": info.fit, "keep": info.keep, "lr": info.lr,
                           "elapsed": info.elapsed, "first_step": info.first_step, **info.reports})
        picture = preview() if preview is not None else None
        # under a server this hook raises when Cancel is pressed
        pbar.update_absolute(info.step, info.total, ("JPEG", picture, PREVIEW_MAX) if picture is not None else None)
        mm.throw_exception_if_processing_interrupted()  # ...and this catches Cancel when no hook is set
    return cb


def range_problem(node_cls, **values) -> bool | str:
    """For a validate_inputs: the ranges ComfyUI itself checks only for inputs validate_inputs does not name (and
    for none when it takes **kw, as APT Options does: bins 1,000,000 went through). True, or the reason shown."""
    import math

    inputs = {i.id: i for i in node_cls.define_schema().inputs}
    for name, v in values.items():
        spec = inputs.get(name)
        if spec is None or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        lo, hi = getattr(spec, "min", None), getattr(spec, "max", None)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{name} must be a finite number, got {v}."
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return f"{name} {v} is out of range: use a value from {lo} to {hi}."
    return True


def phase_progress(total: int):
    """tick() for a long phase before training (decode, encode, probe): moves the node's bar and stops at Cancel
    between items, so Cancel takes effect within one item, not after the phase (109 s for a dataset's encode)."""
    import comfy.model_management as mm
    import comfy.utils

    pbar = comfy.utils.ProgressBar(max(1, total))
    done = [0]

    def tick(n: int = 1) -> None:
        mm.throw_exception_if_processing_interrupted()
        done[0] += n
        pbar.update_absolute(min(done[0], max(1, total)), max(1, total))  # under a server this hook raises at Cancel
    tick.check = mm.throw_exception_if_processing_interrupted  # for a phase with no count (one probe forward)
    return tick


def feeds(prompt: dict | None, node_id: str | None, class_type: str) -> bool:
    """Whether the queued graph links an output of node_id straight into a node of class_type (e.g. the trainer's
    LoRA into Save CAT LoRA), so the trainer can check that node's storage before training."""
    for node in (prompt or {}).values():
        if isinstance(node, dict) and node.get("class_type") == class_type:
            if any(isinstance(v, list) and len(v) == 2 and str(v[0]) == str(node_id)
                   for v in node.get("inputs", {}).values()):
                return True
    return False


MODEL_FILE_INPUTS = ("ckpt_name", "unet_name")  # CheckpointLoaderSimple, UNETLoader (and loaders shaped like them)


def model_file_name(prompt: dict | None, node_id: str | None, input_name: str = "model", hops: int = 32) -> str:
    """The checkpoint file a node's MODEL came from, read off the queued graph: follow the MODEL link upstream
    (through LoRA loaders, ModelSampling and the like, which pass it on as their own `model` input) to the
    loader that names a file. '' where the graph does not say (a MODEL built in code, a loop, a missing node).
    ComfyUI keeps no file name on the MODEL itself; kohya's ss_sd_model_name wants one."""
    found = model_file(prompt, node_id, input_name, hops)
    return found[1] if found else ""


def model_file(prompt: dict | None, node_id: str | None, input_name: str = "model",
               hops: int = 32) -> tuple[str, str] | None:
    """(the loader's input, the file it names) that model_file_name follows to: `ckpt_name` files are in the
    checkpoints folder, `unet_name` ones in diffusion_models. None where the graph does not say."""
    node = (prompt or {}).get(str(node_id)) if node_id is not None else None
    for _ in range(hops):
        if not isinstance(node, dict):
            return None
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            return None
        named = next((k for k in MODEL_FILE_INPUTS if isinstance(inputs.get(k), str)), None)
        if named is not None:
            return named, inputs[named]
        link = inputs.get(input_name)
        if not (isinstance(link, list) and len(link) == 2):
            return None
        node, input_name = prompt.get(str(link[0])), "model"
    return None
