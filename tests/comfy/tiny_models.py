"""Tiny SD1.x- and SDXL-shaped models built by ComfyUI's own classes (no pytest; the server test's
helper node pack imports this too). ComfyUI leaves weights uninitialised, so they are set here."""
from __future__ import annotations

from pathlib import Path

import torch


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
# SD3-shaped MMDiT: hidden 64 * depth = 128, 2 heads; joint block 0 has SD3.5M's extra x-block attention (attn2);
# context 4096 wide because ComfyUI's SD3 text encoder pads CLIP-L/G to T5's width; pooled = CLIP-L + CLIP-G (32 + 32)
TINY_SD3_DIT = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=64,
                    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                    num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None, x_block_self_attn_layers=[0])
# Flux-shaped: hidden 64, 2 heads (rope axes 8 + 12 + 12 = head dim 32), one double and two single blocks,
# T5 width 32 (context), CLIP-L pooled 32 (vec), guidance input as in Flux dev
TINY_FLUX_DIT = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=32, context_in_dim=32,
                     hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12],
                     theta=10000, qkv_bias=True, guidance_embed=True)
T5_SMALL = dict(d_ff=64, d_kv=16, d_model=32, num_heads=2, num_layers=2)
CLIP_SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)


def tiny_model(kind: str = "sd15", seed: int = 0, v_prediction: bool = False, dtype: torch.dtype = torch.float32):
    """(MODEL, CLIP, VAE) of a tiny SD1.x-, SDXL-, SD3- or Flux-shaped model, built by ComfyUI's own classes;
    `dtype` is the network's storage dtype, as a checkpoint loads on a GPU (bf16/fp16)."""
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
    elif kind == "sd3":
        import comfy.text_encoders.sd3_clip as sd3_clip

        class TinySD3(sm.SD3):
            unet_config = {"in_channels": 16, "pos_embed_scaling_factor": None}
        cfg = TinySD3(dict(TINY_SD3_DIT))
        target = ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
        clip_opts = {"clip_l_model_config": dict(CLIP_SMALL), "clip_g_model_config": dict(CLIP_SMALL)}
    elif kind == "flux":
        import comfy.text_encoders.flux as flux_te

        class TinyFlux(sm.Flux):
            unet_config = {"image_model": "flux", "guidance_embed": True}
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        dit = dict(TINY_FLUX_DIT)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # required in v0.33 (not in v0.3.64): [] is Flux.1
            dit["txt_ids_dims"] = []
        cfg = TinyFlux(dit)
        target = ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip(dtype_t5=torch.float32))
        clip_opts = {"clip_l_model_config": dict(CLIP_SMALL), "t5xxl_model_config": dict(T5_SMALL)}
    elif kind in NEWER_FAMILIES:
        return NEWER_FAMILIES[kind](seed, dtype)
    else:
        raise ValueError(kind)
    cfg.set_inference_dtype(dtype, None)
    if v_prediction:  # what ComfyUI's detection does for an SD2-style v model
        cfg.model_type = lambda state_dict, prefix="": __import__("comfy.model_base").model_base.ModelType.V_PREDICTION
    base = cfg.get_model({})
    _init_(base.diffusion_model, seed)
    if kind == "sd3":  # the position table is a buffer ComfyUI leaves empty: small random positions
        with torch.no_grad():
            base.diffusion_model.pos_embed.copy_(torch.randn(base.diffusion_model.pos_embed.shape,
                                                             generator=torch.Generator().manual_seed(seed)) * 0.1)
    base.diffusion_model.to(dtype)
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    clip = comfy.sd.CLIP(target, model_options={**clip_opts, "dtype": torch.float32})
    _init_(clip.cond_stage_model, seed + 1, std=0.2)

    z = 16 if kind in ("sd3", "flux") else 4
    dd = {"double_z": True, "z_channels": z, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": dd, "embed_dim": z}}, dtype=torch.float32)
    vae.latent_channels = z
    _init_(vae.first_stage_model, seed + 2, std=0.1)
    return mp, clip, vae


# --- Qwen-Image, Flux.2, Chroma (issue 29) ---
# Qwen-Image-shaped: 2 joint blocks, hidden 32 (2 heads of 16; rope axes 4 + 6 + 6), text width 32; 16 latent channels
# patched 2x2 (64 in), latents 5-D (B, C, frames, h, w) as the Wan 2.1 VAE gives them
TINY_QWEN_DIT = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
# the Qwen2.5 text stack at toy size (Qwen2.5-VL's vision tower is 0.6B parameters whatever the config says, and
# images are not encoded here): ComfyUI's Qwen-Image tokenizer, template and template cut run unchanged around it
TINY_QWEN25 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1)


def _tiny_wan_vae(seed: int):
    """A Wan 2.1 VAE at toy width (dim 8) built by ComfyUI from a state dict. Where ComfyUI builds every Wan 2.1 VAE at
    full width (v0.3.64: dim 96, 127M parameters), a 16-channel image VAE instead: there the pack refuses Qwen-Image
    before any latent reaches the network, and a graph needs some VAE to get that far."""
    import inspect

    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    if "image_channels" not in inspect.signature(WanVAE.__init__).parameters:
        dd = {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
              "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
        vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": dd, "embed_dim": 16}}, dtype=torch.float32)
        vae.latent_channels = 16
        _init_(vae.first_stage_model, seed, std=0.1)
        return vae
    net = WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])
    _init_(net, seed, std=0.1)
    return comfy.sd.VAE(sd=net.state_dict())


def tiny_qwen_image(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(MODEL, CLIP, VAE) of a tiny Qwen-Image by ComfyUI's own classes."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models as sm
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_te
    from comfy.supported_models_base import ClipTarget

    class TinyQwenImage(sm.QwenImage):
        unet_config = {"image_model": "qwen_image"}
    cfg = TinyQwenImage(dict(TINY_QWEN_DIT))
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({})
    _init_(base.diffusion_model, seed)
    base.diffusion_model.to(dtype)
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())

    class TinyQwen25(comfy.sd1_clip.SDClipModel):  # Qwen25_7BVLIModel's settings over a text-only Qwen2.5 stack
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True, model_options=None):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                             special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=llama.Qwen25_3B,
                             enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                             model_options=model_options or {})
    target = ClipTarget(qwen_te.QwenImageTokenizer, qwen_te.te())
    clip = comfy.sd.CLIP(target, model_options={"qwen25_7b_class": TinyQwen25, "qwen25_7b_model_config": dict(TINY_QWEN25),
                                                "dtype": torch.float32})
    _init_(clip.cond_stage_model, seed + 1, std=0.2)
    return mp, clip, _tiny_wan_vae(seed + 2)


# Flux.2-shaped as ComfyUI's detection reads a Flux.2 file (patch 1 over 128 packed latent channels, four rope axes,
# shared modulation, SiLU-gated MLP, no biases, text positions on one axis), at hidden 64 (2 heads of 32), one double
# and two single blocks; text = 3 taps of a toy Qwen3 (Klein's encoder) of width 16 -> 48
TINY_FLUX2_DIT = dict(image_model="flux2", in_channels=128, out_channels=128, patch_size=1, vec_in_dim=None,
                      context_in_dim=48, hidden_size=64, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=2,
                      axes_dim=[8, 8, 8, 8], theta=2000, qkv_bias=False, ops_bias=False, global_modulation=True,
                      mlp_silu_act=True, default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3])
# Klein taps hidden layers 9, 18 and 27 of Qwen3 4B: 28 layers, each a toy
TINY_QWEN3 = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1)


def tiny_flux2(seed: int = 0, dtype: torch.dtype = torch.float32, guidance: bool = True):
    """(MODEL, CLIP, None) of a tiny Flux.2 by ComfyUI's own classes: guidance input as Flux.2 dev (guidance=False:
    Klein's distilled shape without one); the text encoder is Klein's (ComfyUI's Klein tokenizer and template, its
    3-layer tap, a toy Qwen3). No VAE: the tests feed 128-channel latents. Where ComfyUI has no Flux.2 (v0.3.64), a
    tiny Flux.1 in ComfyUI's Flux model class with Flux.2's shared-modulation module added stands in, for the refusal."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.text_encoders.flux as flux_te
    from comfy.supported_models_base import ClipTarget

    if not hasattr(sm, "Flux2"):  # v0.3.64: no Flux.2 anywhere; the module tree of one in ComfyUI's Flux model class
        mp = tiny_model("flux", seed, dtype=dtype)[0]
        mp.model.diffusion_model.double_stream_modulation_img = torch.nn.Identity()
        return mp, None, None

    class TinyFlux2(sm.Flux2):
        unet_config = {"image_model": "flux2"}
    cfg = TinyFlux2(dict(TINY_FLUX2_DIT, guidance_embed=guidance))
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({})
    _init_(base.diffusion_model, seed)
    base.diffusion_model.to(dtype)
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    target = ClipTarget(flux_te.KleinTokenizer, flux_te.klein_te(model_type="qwen3_4b"))
    clip = comfy.sd.CLIP(target, model_options={"qwen3_4b_model_config": dict(TINY_QWEN3), "dtype": torch.float32})
    _init_(clip.cond_stage_model, seed + 1, std=0.2)
    return mp, clip, None


# Chroma-shaped as ComfyUI's detection reads a Chroma file (64 packed input channels, the approximator of in_dim 64 =
# timestep 16 + guidance 16 + block index 32), hidden 64 (2 heads), one double and two single blocks, approximator 2
# layers of 32, T5 width 32
TINY_CHROMA_DIT = dict(image_model="chroma", in_channels=64, out_channels=64, patch_size=2, context_in_dim=32,
                       hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[8, 12, 12],
                       theta=10000, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=2)


def tiny_chroma(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(MODEL, CLIP, VAE) of a tiny Chroma by ComfyUI's own classes: its T5 tokenizer and encoder path (PixArt's, which
    Chroma uses) over a toy T5, a 16-channel VAE as Flux's."""
    import dataclasses

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models as sm
    import comfy.text_encoders.pixart_t5 as pixart
    from comfy.ldm.chroma.model import ChromaParams
    from comfy.supported_models_base import ClipTarget

    class TinyChroma(sm.Chroma):
        unet_config = {"image_model": "chroma"}
    dit = dict(TINY_CHROMA_DIT)
    fields = {f.name for f in dataclasses.fields(ChromaParams)}
    dit.update({k: v for k, v in (("txt_ids_dims", []), ("vec_in_dim", None)) if k in fields})  # v0.33 requires them
    cfg = TinyChroma(dit)
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({})
    _init_(base.diffusion_model, seed)
    base.diffusion_model.to(dtype)
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    clip = comfy.sd.CLIP(ClipTarget(pixart.PixArtTokenizer, pixart.pixart_te()),
                         model_options={"t5xxl_model_config": dict(T5_SMALL), "dtype": torch.float32})
    _init_(clip.cond_stage_model, seed + 1, std=0.2)
    flux_vae = tiny_model("flux", seed)[2]  # the same 16-channel toy VAE
    return mp, clip, flux_vae


NEWER_FAMILIES = {"qwen_image": tiny_qwen_image, "flux2": tiny_flux2, "chroma": tiny_chroma,
                  "flux2_klein": lambda seed=0, dtype=torch.float32: tiny_flux2(seed, dtype, guidance=False)}


def make_images(folder: Path, n: int = 3, size: int = 128, caption: str = "a photo of sks dog", seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size * (1 + i % 2), 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption if i else "")  # one captionless image gets the trigger
    return folder


def tiny_checkpoint_node():
    """A loader node returning the tiny MODEL/CLIP/VAE like CheckpointLoaderSimple (built once per kind).
    Defined in a function: comfy_api is importable only once ComfyUI is on sys.path."""
    from comfy_api.latest import io

    cache: dict = {}

    class TinyCheckpoint(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            # ckpt_name: the file a shipped graph named, kept so the graph still says where its MODEL came from
            return io.Schema(node_id="CATTest_TinyCheckpoint", inputs=[io.Combo.Input("kind", options=["sd15", "sdxl", "sd3", "flux", *NEWER_FAMILIES]),
                                                                       io.String.Input("ckpt_name", default="", optional=True)],
                             outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()])

        @classmethod
        def execute(cls, kind, ckpt_name=""):
            if kind not in cache:
                cache[kind] = tiny_model(kind)
            return io.NodeOutput(*cache[kind])

    TinyCheckpoint.cache = cache  # tests reach the built models through it
    return TinyCheckpoint


TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def register_tiny_open_clip(clip_dir) -> str:
    """open_clip architecture 'CATTinyCLIP' registered in this process, a seeded checkpoint of it in clip_dir
    (a test server's models/clip, so a shipped KPS Evaluator runs there); returns the file name."""
    import json
    import tempfile

    import open_clip

    d = Path(tempfile.mkdtemp())
    (d / "CATTinyCLIP.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(d)
    path = Path(clip_dir) / "cat_tiny_open_clip.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(open_clip.create_model("CATTinyCLIP").state_dict(), path)
    return path.name


# ---- NextDiT (Lumina Image 2.0, Z-Image), Wan 2.x and HiDream: networks only, built by ComfyUI's own model classes.
# Hidden 64, 2 heads of 32 = rope axes 8 + 12 + 12; caption features 32 wide. Z-Image: its 256-wide one-Linear
# modulation (so hidden 256 at least: 2 heads of 128 = its real axes 32 + 48 + 48), pad tokens and time scale as
# ComfyUI's detection sets them for the real model.
TINY_LUMINA2_DIT = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=32, n_layers=2,
                        n_refiner_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True, axes_dims=[8, 12, 12],
                        axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0, multiple_of=16)
TINY_ZIMAGE_DIT = dict(TINY_LUMINA2_DIT, dim=256, n_kv_heads=2, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                       ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)

# Wan 2.1 text-to-video: hidden 64, 2 heads, 2 blocks, T5 width 32 (the real one: umT5-XXL 4096, 512 tokens)
TINY_WAN_DIT = dict(image_model="wan2.1", model_type="t2v", dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=2,
                    text_dim=32, text_len=16, in_dim=16, out_dim=16)

# HiDream-I1: 2 heads of 32 (rope axes 16 + 8 + 8), one double and one single block, 4 routed experts (2 active);
# T5 and Llama widths 32 (caption_channels), pooled CLIP-L+G 64; each block reads its own Llama layer (2 of them)
TINY_HIDREAM_DIT = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                        num_single_layers=1, attention_head_dim=32, num_attention_heads=2, caption_channels=[32, 32],
                        text_emb_dim=64, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[16, 8, 8],
                        max_resolution=[16, 16], llama_layers=[0, 1])


def tiny_network(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """MODEL (a ModelPatcher) of a tiny lumina2-, zimage-, wan- or hidream-shaped network built by ComfyUI's own
    config and model classes (zimage: AttributeError on a ComfyUI without Z-Image, v0.3.64)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    if kind == "lumina2":
        import inspect

        from comfy.ldm.lumina.model import NextDiT

        class TinyLumina2(sm.Lumina2):
            unet_config = {"image_model": "lumina2"}
        takes = inspect.signature(NextDiT).parameters  # v0.3.64's NextDiT has no rope_theta (10000 fixed)
        cfg = TinyLumina2({k: v for k, v in TINY_LUMINA2_DIT.items() if k in takes or k == "image_model"})
    elif kind == "zimage":
        class TinyZImage(sm.ZImage):
            unet_config = {"image_model": "lumina2"}
        cfg = TinyZImage(dict(TINY_ZIMAGE_DIT))
    elif kind == "wan":
        class TinyWan(sm.WAN21_T2V):
            unet_config = {"image_model": "wan2.1", "model_type": "t2v"}
        cfg = TinyWan(dict(TINY_WAN_DIT))
    elif kind == "hidream":
        class TinyHiDream(sm.HiDream):
            unet_config = {"image_model": "hidream"}
            sampling_settings = {"shift": 3.0}  # HiDream's workflows set it (ModelSamplingSD3); ComfyUI's config has none
        cfg = TinyHiDream(dict(TINY_HIDREAM_DIT))
    else:
        raise ValueError(kind)
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({})
    _init_(base.diffusion_model, seed)
    base.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


# Caption encoders as ComfyUI builds them, at tiny size: Lumina's own Gemma 2 class and Z-Image's own Qwen3 class
# (hidden 32 = the tiny NextDiTs' caption width; Gemma's/Qwen's head width 256/128 is fixed by their configs). Gemma's
# sentencepiece file comes with its weights (absent here), so the Gemma stand-in reads ComfyUI's Qwen2 vocabulary.
TINY_GEMMA2 = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                   num_key_value_heads=1)
TINY_QWEN3 = TINY_GEMMA2


def tiny_caption_encoder(kind: str, seed: int = 0):
    """CLIP of a tiny caption encoder for 'lumina2' (v0.3.64 and v0.33) or 'zimage' (where ComfyUI has Z-Image)."""
    import os

    import comfy.sd
    import comfy.sd1_clip as sd1
    import comfy.text_encoders.llama as llama
    from comfy.supported_models_base import ClipTarget

    name, model_class = {"lumina2": ("gemma2_2b", llama.Gemma2_2B), "zimage": ("qwen3_4b", getattr(llama, "Qwen3_4B", None))}[kind]

    class Encoder(sd1.SDClipModel):  # as ComfyUI's Gemma2_2BModel / Qwen3_4BModel, at tiny size
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(TINY_GEMMA2),
                             dtype=dtype, special_tokens={"start": 2, "pad": 0} if kind == "lumina2" else {"pad": 151643},
                             layer_norm_hidden_state=False, model_class=model_class, enable_attention_masks=True,
                             return_attention_masks=True, model_options=model_options or {})

    class TE(sd1.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, dtype=dtype, name=name, clip_model=Encoder, model_options=model_options or {})

    if kind == "zimage":
        from comfy.text_encoders.z_image import ZImageTokenizer as Tokenizer  # its chat template included
    else:
        from transformers import Qwen2Tokenizer

        class GemmaStandIn(sd1.SDTokenizer):
            def __init__(self, embedding_directory=None, tokenizer_data=None):
                path = os.path.join(os.path.dirname(llama.__file__), "qwen25_tokenizer")
                super().__init__(path, pad_with_end=False, embedding_size=32, embedding_key=name,
                                 tokenizer_class=Qwen2Tokenizer, has_start_token=False, has_end_token=False,
                                 pad_to_max_length=False, max_length=99999999, min_length=1, pad_token=151643,
                                 tokenizer_data=tokenizer_data or {})

        class Tokenizer(sd1.SD1Tokenizer):
            def __init__(self, embedding_directory=None, tokenizer_data=None):
                super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {}, name=name,
                                 tokenizer=GemmaStandIn)
    clip = comfy.sd.CLIP(ClipTarget(Tokenizer, TE), model_options={"dtype": torch.float32})
    _init_(clip.cond_stage_model, seed, std=0.2)
    return clip


def tiny_vae16(seed: int = 2):
    """The tiny 16-channel VAE the SD3/Flux models use (Lumina 2's and Z-Image's latents are Flux's)."""
    import comfy.sd

    dd = {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": dd, "embed_dim": 16}}, dtype=torch.float32)
    vae.latent_channels = 16
    _init_(vae.first_stage_model, seed, std=0.1)
    return vae
