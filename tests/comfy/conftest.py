"""Real-ComfyUI fixtures: boots ComfyUI in-process from COMFYUI_PATH and builds tiny SD1.x / SDXL models.

Without COMFYUI_PATH every test here is skipped with the reason (never passed vacuously).
Tiny models: the supported-model classes are subclassed with a small unet_config so ComfyUI builds
its own BaseModel/UNet/CLIP/VAE code paths; ComfyUI leaves weights uninitialised (torch.empty),
so every parameter is initialised here from a fixed seed.
"""
from __future__ import annotations

import asyncio
import os
import sys
import types
from pathlib import Path

import pytest
import torch

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
    pack = sys.modules[nodes.NODE_CLASS_MAPPINGS["CAT_LoraTrainer"].__module__.rsplit(".", 1)[0]]
    ns = types.SimpleNamespace(nodes=nodes, folder_paths=folder_paths, root=tmp_root, pack=pack,
                               pack_name=pack.__name__.split(".")[0])
    _BOOT["ns"] = ns
    return ns


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    return boot_comfy(tmp_path_factory.mktemp("comfyroot"))


def pack_module(comfy, name: str):
    """A submodule of this pack as ComfyUI imported it (its module name is the pack's folder path)."""
    import importlib
    return importlib.import_module(f"{comfy.pack_name}.{name}")


def _init_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            elif p.ndim == 1:  # norm scales
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.01)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * min(std, fan_in ** -0.5))
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()


TINY_SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                      adm_in_channels=None, in_channels=4, model_channels=32, num_res_blocks=[1, 1],
                      transformer_depth=[1, 1], channel_mult=[1, 2], transformer_depth_middle=1,
                      use_linear_in_transformer=False, context_dim=64, transformer_depth_output=[1, 1, 1, 1],
                      use_temporal_attention=False, use_temporal_resblock=False)
TINY_SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                      num_classes="sequential", adm_in_channels=32 + 6 * 256, in_channels=4, model_channels=32,
                      num_res_blocks=[1, 1], transformer_depth=[0, 1], channel_mult=[1, 2], transformer_depth_middle=1,
                      use_linear_in_transformer=True, context_dim=64, transformer_depth_output=[0, 0, 1, 1],
                      use_temporal_attention=False, use_temporal_resblock=False)
CLIP_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)


def tiny_model(kind: str = "sd15", seed: int = 0):
    """(MODEL, CLIP, VAE) of a tiny SD1.x-shaped or SDXL-shaped model, built by ComfyUI's own classes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models as sm
    from comfy.supported_models_base import ClipTarget

    if kind == "sd15":
        class TinySD15(sm.SD15):
            unet_config = {"context_dim": 64, "model_channels": 32}
            unet_extra_config = {"num_heads": 2, "num_head_channels": -1}
        cfg = TinySD15(TINY_SD15_UNET)
        target = ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        clip_opts = {"clip_l_model_config": dict(CLIP_SMALL, hidden_size=64, intermediate_size=128, projection_dim=64)}
    elif kind == "sdxl":
        class TinySDXL(sm.SDXL):
            unet_config = {"context_dim": 64, "model_channels": 32}
            unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
        cfg = TinySDXL(TINY_SDXL_UNET)
        target = ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
        clip_opts = {"clip_l_model_config": dict(CLIP_SMALL), "clip_g_model_config": dict(CLIP_SMALL)}
    else:
        raise ValueError(kind)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    _init_(base.diffusion_model, seed)
    base.diffusion_model.float()
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    clip = comfy.sd.CLIP(target, model_options={**clip_opts, "dtype": torch.float32})
    _init_(clip.cond_stage_model, seed + 1, std=0.2)

    dd = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": dd, "embed_dim": 4}}, dtype=torch.float32)
    _init_(vae.first_stage_model, seed + 2, std=0.1)
    return mp, clip, vae


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    return tiny_model("sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(comfy):
    return tiny_model("sdxl")


def make_images(folder: Path, n: int = 3, size: int = 128, caption: str = "a photo of sks dog", seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size * (1 + i % 2), 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption if i else "")  # one captionless image gets the trigger
    return folder


@pytest.fixture(scope="session")
def dataset_dir(comfy):
    return make_images(Path(comfy.folder_paths.get_input_directory()) / "cat_test_ds")


@pytest.fixture(scope="session")
def test_checkpoint_node(comfy):
    """A loader node for the executor tests: returns the tiny MODEL/CLIP/VAE like CheckpointLoaderSimple."""
    from comfy_api.latest import io

    cache = {}

    class TinyCheckpoint(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="CATTest_TinyCheckpoint", inputs=[io.Combo.Input("kind", options=["sd15", "sdxl"])],
                             outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

        @classmethod
        def execute(cls, kind):
            if kind not in cache:
                cache[kind] = tiny_model(kind)
            return io.NodeOutput(*cache[kind])

    comfy.nodes.NODE_CLASS_MAPPINGS["CATTest_TinyCheckpoint"] = TinyCheckpoint
    return cache


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
    ex = execution.PromptExecutor(FakeServer(), cache_type=False)
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
