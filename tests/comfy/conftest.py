"""Real-ComfyUI fixtures: boots ComfyUI in-process from COMFYUI_PATH and builds tiny SD1.x / SDXL models.

Without COMFYUI_PATH every test here is skipped with the reason (never passed vacuously).
Tiny models: the supported-model classes are subclassed with a small unet_config so ComfyUI builds
its own BaseModel/UNet/CLIP/VAE code paths; ComfyUI leaves weights uninitialised (torch.empty),
so every parameter is initialised here from a fixed seed.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from tiny_models import make_images, tiny_model  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
COMFY = os.environ.get("COMFYUI_PATH")
SKIP_REASON = "COMFYUI_PATH is not set: point it at a ComfyUI checkout to run the ComfyUI integration tests"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.comfyui)
            if not COMFY:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
            elif not (Path(COMFY) / "comfy" / "model_patcher.py").exists():
                item.add_marker(pytest.mark.skip(reason=f"COMFYUI_PATH={COMFY} is not a ComfyUI checkout (no comfy/model_patcher.py)"))


_BOOT = {}


def boot_comfy(tmp_root: Path):
    """Import ComfyUI (CPU), its built-in node packs and this pack; redirect models/input/output to tmp_root."""
    if _BOOT:
        return _BOOT["ns"]
    torch.set_num_threads(1)
    if COMFY not in sys.path:
        sys.path.insert(0, COMFY)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = True
    import folder_paths
    for sub in ("loras", "clip", "checkpoints", "input", "output", "temp"):
        (tmp_root / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(tmp_root / "loras"), is_default=True)
    folder_paths.add_model_folder_path("clip", str(tmp_root / "clip"), is_default=True)
    folder_paths.set_input_directory(str(tmp_root / "input"))
    folder_paths.set_output_directory(str(tmp_root / "output"))
    folder_paths.set_temp_directory(str(tmp_root / "temp"))
    import utils.install_util  # noqa: F401  (before `nodes` shadows ComfyUI's utils package with comfy/utils.py)
    import server  # noqa: F401
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if "CAT_LoraTrainer" not in nodes.NODE_CLASS_MAPPINGS:
        ok = asyncio.run(nodes.load_custom_node(str(ROOT)))
        assert ok, "ComfyUI failed to import this pack; see the log above"
    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CAT_LoraTrainer"].__module__.split(".")[0]]  # ComfyUI names it by its path
    ns = types.SimpleNamespace(nodes=nodes, folder_paths=folder_paths, root=tmp_root, pack=pack, pack_name=pack.__name__)
    _BOOT["ns"] = ns
    return ns


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    return boot_comfy(tmp_path_factory.mktemp("comfyroot"))


def pack_module(comfy, name: str):
    """A submodule of this pack as ComfyUI imported it (its module name is the pack's folder path)."""
    import importlib
    return importlib.import_module(f"{comfy.pack_name}.{name}")


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    return tiny_model("sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(comfy):
    return tiny_model("sdxl")


@pytest.fixture(scope="session")
def dataset_dir(comfy):
    return make_images(Path(comfy.folder_paths.get_input_directory()) / "cat_test_ds")


@pytest.fixture(scope="session")
def test_checkpoint_node(comfy):
    """A loader node for the executor tests: returns the tiny MODEL/CLIP/VAE like CheckpointLoaderSimple."""
    from tiny_models import tiny_checkpoint_node

    TinyCheckpoint = tiny_checkpoint_node()
    comfy.nodes.NODE_CLASS_MAPPINGS["CATTest_TinyCheckpoint"] = TinyCheckpoint
    return TinyCheckpoint.cache


class FakeServer:
    """What ComfyUI's executor needs of a PromptServer; records every message."""
    client_id = None
    last_node_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def run_prompt(prompt: dict):
    """Validate and execute an API-format prompt in ComfyUI's own executor; returns the executor."""
    import execution

    valid, err, outputs, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert valid, f"ComfyUI rejected the prompt: {err} {node_errors}"
    # the classic cache, as `main.py --cache-classic` builds it: newer executors (the RAM-pressure cache) read their
    # RAM headroom from cache_args on every run, so they need it, which v0.3.64's executor does not take
    takes_cache_args = "cache_args" in inspect.signature(execution.PromptExecutor).parameters
    extra = {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}} if takes_cache_args else {}
    ex = execution.PromptExecutor(FakeServer(), cache_type=False, **extra)
    ex.execute(prompt, "t", {"client_id": None}, outputs)
    return ex


@pytest.fixture(scope="session")
def tiny_open_clip(comfy, tmp_path_factory):
    """A random tiny open_clip model registered under 'CATTinyCLIP', its checkpoint in models/clip."""
    import json

    import open_clip

    d = tmp_path_factory.mktemp("openclip")
    (d / "CATTinyCLIP.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    ckpt = Path(comfy.folder_paths.get_folder_paths("clip")[0]) / "cat_tiny_open_clip.pt"
    torch.save(open_clip.create_model("CATTinyCLIP").state_dict(), ckpt)
    return ckpt.name


def shrink_for_cpu(g: dict, kind: str, dataset_dir, open_clip_name: str, **trainer) -> dict:
    """A shipped API graph made to run on the tiny models in seconds: the loader(s) swapped for the tiny
    checkpoint node, the dataset pointed at the test images, sizes and steps cut; `trainer` overrides
    the LoRA trainer's inputs (its defaults: 3 steps, rank 4, lr 1e-2, fp32, no mid-run saves)."""
    shipped = g["1"]["inputs"]
    g["1"] = {"class_type": "CATTest_TinyCheckpoint",
              "inputs": {"kind": kind, "ckpt_name": shipped.get("ckpt_name", shipped.get("unet_name", ""))}}
    separate = {k: slot for k, slot in (("3", 1), ("4", 2))
                if g.get(k, {}).get("class_type") in ("DualCLIPLoader", "CLIPLoader", "VAELoader")}
    for k, slot in separate.items():  # Flux, Qwen-Image: CLIP and VAE from the tiny checkpoint too
        del g[k]
        for node in g.values():
            for name, v in node["inputs"].items():
                if isinstance(v, list) and v[0] == k:
                    node["inputs"][name] = ["1", slot]
    small = {
        "CAT_Dataset": dict(folder=str(dataset_dir), resolution=128),
        "CAT_LoraTrainer": dict(dict(steps=3, save_every=0, dtype="fp32", rank=4, lora_alpha=4.0, learning_rate=1e-2), **trainer),
        "CAT_CatVersionTrainer": dict(steps=3),
        "EmptyLatentImage": dict(width=64, height=64, batch_size=2),
        "EmptySD3LatentImage": dict(width=64, height=64, batch_size=2),
        "KSampler": dict(steps=2),
        "CAT_KPSEvaluator": dict(clip_checkpoint=open_clip_name, open_clip_model="CATTinyCLIP"),
        "CAT_LeakScan": dict(width=64, height=64, steps=2, images_per_probe=1, top_k=2, clip_checkpoint=open_clip_name,
                             open_clip_model="CATTinyCLIP"),
    }
    for node in g.values():
        node["inputs"].update(small.get(node["class_type"], {}))
    return g


def adapted_vs_stock_predictions(comfy, mp, den, example, weights, spec, loaded, t):
    """(base, adapted, stock, restored) predictions of one training example at timestep t: the base UNet, the
    trainer's adapter injected with `weights`, the stock-loaded LoRA patcher `loaded` (its weights merged into
    the shared UNet), and the base again after ComfyUI unpatched it."""
    import comfy.model_management as mm

    A = pack_module(comfy, "cat_train.adapters.lora")
    unet = mp.model.diffusion_model
    x_t = den.schedule.add_noise(example.latent[None], torch.randn_like(example.latent[None]), t)
    cond = {k: v[None] for k, v in example.cond_token.items()}
    with torch.no_grad():
        base = den.predict(x_t, t, cond)
        A.inject_lora(unet, spec)
        A.load_lora_weights(unet, weights)
        adapted = den.predict(x_t, t, cond)
        A.remove_lora(unet)
        mm.load_models_gpu([loaded])
        stock = den.predict(x_t, t, cond)
        loaded.unpatch_model()
        restored = den.predict(x_t, t, cond)
    return base, adapted, stock, restored


@contextlib.contextmanager
def progress_hook(hook):
    """`hook` as ComfyUI's global progress hook (the server's sends `progress` and raises at Cancel), called on every
    update the pack makes. ComfyUI's ProgressBar now throttles its hook (the first, last and preview updates always
    reach it, others only 100 ms and 0.5% apart: PROGRESS_THROTTLE_MIN_* in comfy/utils.py), so on a fast machine
    a test pressing Cancel at a given value, or counting the pack's updates, would see some and not others; with
    the throttle off the hook sees each update, as every ComfyUI before the throttle called it."""
    from comfy import utils as comfy_utils

    throttle = {n: getattr(comfy_utils, n) for n in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT")
                if hasattr(comfy_utils, n)}
    for n in throttle:
        setattr(comfy_utils, n, 0)
    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        for n, v in throttle.items():
            setattr(comfy_utils, n, v)


@contextlib.contextmanager
def cancelled_after(step: int, total: int | None = None):
    """A user pressing Cancel once the progress bar reaches `step`, as ComfyUI's server hook sees it: the run must
    stop with InterruptProcessingException. Yields the progress values seen; the hook and the flag are reset after.
    total: watch only the bar of that length (the trainer's preparation has a bar of its own before the steps')."""
    import comfy.model_management as mm

    seen = []

    def hook(value, total_, preview, node_id=None):
        if total is not None and total_ != total:
            return
        seen.append(value)
        if value == step:
            mm.interrupt_current_processing(True)
    try:
        with progress_hook(hook), pytest.raises(mm.InterruptProcessingException):
            yield seen
    finally:
        mm.interrupt_current_processing(False)
