"""Memory of CAT training on a bf16 model: the budget the trainer prints before step 1, and the measured peak.

Budget (any machine, no weights, seconds): the UNet is built by ComfyUI's own classes on the meta device
and probed at the real latent size, as the trainer node probes it on the user's device. Printed for the
SD1.5 shape at 512 px, the SDXL shape at 1024 px, the Flux dev shape at 1024 px (256 T5 tokens, ComfyUI's
minimum), then at 1024 px the published shapes of Chroma, Qwen-Image (128 text tokens), Flux.2 dev and Klein (where
ComfyUI has Flux.2), Lumina Image 2.0, Z-Image, Wan 2.1 1.3B and 14B (one frame) and HiDream-I1 (NEW_FAMILIES; Z-Image
needs a ComfyUI with its model class), bf16 weights and compute, CAT alpha = 1 (y_T and y in one adapted pass), batch
1, rank 16 'attn', gradient checkpointing off and on.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/memory.py                      # budget table
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/memory.py --measure sd15 --res 128 --steps 2
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/memory.py --measure sd15 --res 128 --steps 2 --native

--measure trains for real in a subprocess (bf16 weights, random init) and prints the measured growth of
memory during training (GPU: torch.cuda.max_memory_allocated over the loaded weights; CPU: peak RSS over
the RSS after a warm-up forward) next to the budget's prediction and next to what the old in-place fp32
conversion added by itself (the fp32 copy minus the bf16 weights: 2 bytes a parameter).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GiB = 1024 ** 3

SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64, num_heads=-1,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
                 use_temporal_resblock=False)


def _pack():
    import importlib.util

    root = HERE.parent
    if "comfyui_cat" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfyui_cat", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_cat"] = pack
        spec.loader.exec_module(pack)
    return sys.modules["comfyui_cat"]


FLUX_DIT = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, qkv_bias=True, guidance_embed=True)  # what ComfyUI's detection reads off Flux dev


# published shapes, as ComfyUI's detection reads them off the released checkpoints (comfy/model_detection.py, v0.33)
LUMINA2_DIT = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=26,
                   n_heads=24, n_kv_heads=8, qk_norm=True, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
                   rope_theta=10000.0, ffn_dim_multiplier=4.0)  # Lumina Image 2.0, 2.6B; Gemma 2 2B captions
ZIMAGE_DIT = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30,
                  n_heads=30, n_kv_heads=30, qk_norm=True, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                  rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                  pad_tokens_multiple=32)  # Z-Image (Turbo), 6B; Qwen3 4B captions
WAN14B_DIT = dict(image_model="wan2.1", model_type="t2v", dim=5120, ffn_dim=13824, freq_dim=256, num_heads=40,
                  num_layers=40, text_dim=4096, text_len=512, in_dim=16, out_dim=16)  # Wan 2.1 / 2.2 A14B (each expert)
WAN1B_DIT = dict(WAN14B_DIT, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)  # Wan 2.1 1.3B
HIDREAM_DIT = dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=16,
                   num_single_layers=32, attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096],
                   text_emb_dim=2048, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=[64, 32, 32],
                   max_resolution=[128, 128], llama_layers=list(range(32)) + [31] * 16)  # HiDream-I1 full/dev/fast, 17B
NEW_FAMILIES = ("lumina2", "zimage", "wan1b", "wan14b", "hidream")


# Qwen-Image's published shape (60 joint blocks of 24 heads x 128, Qwen2.5-VL 7B text width 3584), as ComfyUI reads it
QWEN_IMAGE_DIT = dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                      pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))


# Flux.2 as ComfyUI's detection builds it (patch 1 over 128 packed channels, shared modulation, no biases), at the
# published widths: dev (Mistral Small 3.1 taps: 3 x 5120 text width) and Klein 4B (Qwen3 4B taps: 3 x 2560)
FLUX2_DIT = dict(image_model="flux2", in_channels=128, out_channels=128, patch_size=1, vec_in_dim=None, mlp_ratio=3.0,
                 axes_dim=[32, 32, 32, 32], theta=2000, qkv_bias=False, ops_bias=False, global_modulation=True,
                 mlp_silu_act=True, default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3])
FLUX2_SIZES = {"flux2": dict(hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48, context_in_dim=15360,
                             guidance_embed=True),
               "flux2_klein": dict(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680,
                                   guidance_embed=False)}


# Chroma's published shape (Flux schnell's blocks without their modulation; the approximator 64 -> 5120 x 5 -> 3072)
CHROMA_DIT = dict(image_model="chroma", in_channels=64, out_channels=64, patch_size=2, context_in_dim=4096,
                  hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                  axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120,
                  n_layers=5)


def unet(kind: str, device: str):
    """A ComfyUI-built network of the SD1.5/SDXL/Flux dev shape (or 'mid': SD1.5 layout at 128 channels), or of a
    family in NEW_FAMILIES (published shapes), bf16."""
    import torch
    import comfy.supported_models as sm
    from native_vs_cat import SD15_UNET

    if kind in NEW_FAMILIES:
        cls = {"lumina2": sm.Lumina2, "zimage": getattr(sm, "ZImage", None), "wan1b": sm.WAN21_T2V,
               "wan14b": sm.WAN21_T2V, "hidream": sm.HiDream}[kind]
        shape = {"lumina2": LUMINA2_DIT, "zimage": ZIMAGE_DIT, "wan1b": WAN1B_DIT, "wan14b": WAN14B_DIT,
                 "hidream": HIDREAM_DIT}[kind]
        cfg = cls(dict(shape))
    elif kind == "flux":
        import dataclasses

        from comfy.ldm.flux.model import FluxParams

        dit = dict(FLUX_DIT)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:  # required since v0.33: [] is Flux.1
            dit["txt_ids_dims"] = []
        cfg = sm.Flux(dit)
    elif kind in FLUX2_SIZES:
        cfg = sm.Flux2(dict(FLUX2_DIT, **FLUX2_SIZES[kind]))
    elif kind == "qwen_image":
        cfg = sm.QwenImage(dict(QWEN_IMAGE_DIT))
    elif kind == "chroma":
        import dataclasses

        from comfy.ldm.chroma.model import ChromaParams

        fields = {f.name for f in dataclasses.fields(ChromaParams)}
        cfg = sm.Chroma(dict(CHROMA_DIT, **{k: v for k, v in (("txt_ids_dims", []), ("vec_in_dim", None))
                                            if k in fields}))
    elif kind == "sdxl":
        cfg = sm.SDXL(dict(SDXL_UNET))
    else:
        class Cfg(sm.SD15):
            unet_config = {}
            unet_extra_config = {"num_heads": 8, "num_head_channels": -1}
        cfg = Cfg(dict(SD15_UNET, model_channels=128) if kind == "mid" else dict(SD15_UNET))
    cfg.set_inference_dtype(torch.bfloat16, None)
    with torch.device(device):
        base = cfg.get_model({}, device=torch.device(device))
    return cfg, base


def budget_row(kind: str, res: int, rank: int = 16, alpha: float = 1.0, batch: int = 1) -> dict:
    import torch

    _pack()
    from comfyui_cat.cat_train.adapters.lora import LoraSpec, lora_param_count
    from comfyui_cat.cat_train.training.budget import adapter_bytes, probe_activations, tensor_bytes
    from comfyui_cat.cat_train import families
    from comfyui_cat.nodes.comfy_model import _sdpa

    cfg, base = unet(kind, "meta")
    net = base.diffusion_model
    meta = dict(device="meta", dtype=torch.bfloat16)
    tokens, ctx, channels, kw = {"sdxl": (77, 2048, 4, {"y": torch.empty(1, 2816, **meta)}),
                                 "flux": (256, 4096, 16,
                                          {"y": torch.empty(1, 768, **meta), "guidance": torch.ones(1, **meta)}),
                                 "qwen_image": (128, 3584, 16, {}),  # a 100-word caption, unpadded
                                 "flux2": (512, 15360, 128, {"guidance": torch.ones(1, **meta)}),  # padded to 512
                                 "flux2_klein": (512, 7680, 128, {}),
                                 "chroma": (128, 4096, 16, {"guidance": torch.zeros(1, **meta)}),  # T5, unpadded
                                 # NextDiT: a caption with Lumina's system prompt / Z-Image's chat template
                                 "lumina2": (128, 2304, 16, {"num_tokens": 128}),
                                 "zimage": (128, 2560, 16, {"num_tokens": 128}),
                                 "wan1b": (512, 4096, 16, {}), "wan14b": (512, 4096, 16, {}),  # umT5: 512 tokens
                                 # T5 128 tokens; Llama 3.1 8B: 32 layers' states of 127 tokens; CLIP-L+G pooled
                                 "hidream": (128, 4096, 16, {"y": torch.empty(1, 2048, **meta),
                                                             "encoder_hidden_states_llama3":
                                                                 torch.empty(1, 32, 127, 4096, **meta)}),
                                 }.get(kind, (77, 768, 4, {}))
    down = 16 if kind in FLUX2_SIZES else 8  # Flux.2's latents pack 2x2 pixels of its VAE's /8 grid
    # Qwen-Image's latents are the Wan VAE's (B, C, frames, h, w); Wan trains one-frame clips
    frames = (1,) if kind == "qwen_image" or kind.startswith("wan") else ()

    def forward():
        net(torch.empty(1, channels, *frames, res // down, res // down, **meta), torch.zeros(1, device="meta"),
            context=torch.empty(1, tokens, ctx, **meta), transformer_options={"optimized_attention_override": _sdpa},
            **kw)

    import contextlib

    from torch.fx.experimental import _config as fx_config

    # HiDream's MoE routes tokens by value, which the meta device cannot: every routed expert then sees every token
    # (4 of 4 instead of 2 of 4), an upper bound of its activations
    moe = fx_config.patch(meta_nonzero_assume_all_nonzero=True) if kind == "hidream" else contextlib.nullcontext()
    with moe:
        probe = probe_activations(net, forward, families.of(net).checkpoint_units(net))
    rows = batch * (2 if alpha > 0 else 1)
    return {"kind": kind, "res": res, "weights": tensor_bytes(net.parameters()),
            "adapter": adapter_bytes(lora_param_count(net, LoraSpec(rank=rank))),
            "act_off": probe.plain * rows, "act_on": probe.checkpointed * rows}


def random_bf16_model(kind: str, res: int):
    """(ModelPatcher, BaseModel, generator, context width, 2 latents): random bf16 weights from seed 0, so ours and
    the native node train the very same model on the very same latents."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    _, base = unet(kind, "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.diffusion_model.named_parameters():
            scale = 0.02 if p.ndim > 1 else 0.01
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim == 1 and "norm" in n else 0))
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                          offload_device=mm.unet_offload_device())
    return mp, base, g, 2048 if kind == "sdxl" else 768, torch.randn(2, 4, res // 8, res // 8, generator=g)


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(kind: str, res: int, steps: int, checkpointing: str) -> dict:
    """Real bf16 training (random weights) through the trainer's own path: trainable + budget + train."""
    import torch

    from native_vs_cat import boot

    boot()
    _pack()
    from comfyui_cat.cat_train.adapters.lora import LoraSpec
    from comfyui_cat.cat_train.training import CatLossConfig, Example, TrainConfig, train
    from comfyui_cat.cat_train.training.precision import mixed_precision_name
    from comfyui_cat.nodes.comfy_model import trainable
    from comfyui_cat.nodes.trainer import memory_budget

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mp, base, g, ctx, lat = random_bf16_model(kind, res)
    extra = {"y": torch.randn(2816, generator=g)} if kind == "sdxl" else {}
    examples = [Example(lat[i], {"context": torch.randn(77, ctx, generator=g), **extra},
                        {"context": torch.randn(77, ctx, generator=g), **extra}) for i in range(2)]
    spec, loss = LoraSpec(rank=16, alpha=16), CatLossConfig(alpha=1.0, preservation="empty")
    weights = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters())
    with torch.inference_mode(False), trainable(mp, "auto") as den:
        b = memory_budget(den, examples, spec, loss, TrainConfig(steps=1))  # its probe doubles as the warm-up forward
        on = b.choose_checkpointing(checkpointing)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            start = rss()
        t0 = time.perf_counter()
        cfg = TrainConfig(steps=steps, lr=1e-4, mixed_precision=mixed_precision_name(den.compute_dtype),
                          gradient_checkpointing=on)
        train(den, examples, loss, spec, cfg)
        dt = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else rss()
        dtype = str(den.compute_dtype)
    return {"kind": kind, "res": res, "device": dev, "compute": dtype, "checkpointing": on, "weights": weights,
            "growth": peak - start, "predicted": b.need(on), "fp32_conversion": weights, "step_s": dt,
            "memory": "cuda max allocated" if dev == "cuda" else "peak RSS"}


def measure_native(kind: str, res: int, steps: int, checkpointing: str) -> dict:
    """ComfyUI's own TrainLoraNode on the same bf16 model, latents and rank (bf16 training and LoRA dtype, its
    defaults), memory counted the same way: growth over a warm-up forward's."""
    import torch

    from native_vs_cat import boot

    boot()
    import comfy_extras.nodes_train as nt

    mp, base, g, ctx, lat = random_bf16_model(kind, res)
    cond = torch.randn(1, 77, ctx, generator=g)
    with torch.no_grad(), torch.inference_mode(False):  # the same warm-up as ours: one no-grad forward
        base.diffusion_model(lat[:1].to(torch.bfloat16), torch.tensor([500.0]), context=cond.to(torch.bfloat16))
    weights = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = rss()
    t0 = time.perf_counter()
    with torch.inference_mode(False):
        nt.TrainLoraNode().train(mp, {"samples": lat}, [[cond, {}]], 1, steps, 1, 1e-4, 16, "AdamW", "MSE", 0, "bf16",
                                 "bf16",
                                 "LoRA", checkpointing == "on", "[None]")
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else rss()
    return {"kind": kind, "res": res, "device": dev, "compute": "bf16 (native)", "checkpointing": checkpointing == "on",
            "weights": weights, "growth": peak - start, "predicted": float("nan"), "fp32_conversion": weights,
            "step_s": (time.perf_counter() - t0) / steps,
            "memory": "cuda max allocated" if dev == "cuda" else "peak RSS"}


def threads_for_real_size() -> None:
    """The pack's thread rule for a real-size model (the free cores, unless OMP_NUM_THREADS is set), applied before
    torch loads; threads.py is loaded by its path because importing cat_train.training would load torch first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cat_threads", HERE.parent / "cat_train" / "training" / "threads.py")
    threads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(threads)
    threads.configure_cpu_threads(None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", choices=["mid", "sd15", "sdxl"], help="train for real in a subprocess and measure")
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--checkpointing", choices=["auto", "on", "off"], default="off")
    ap.add_argument("--native", action="store_true",
                    help="with --measure: ComfyUI's TrainLoraNode on the same settings")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not os.environ.get("COMFYUI_PATH"):
        print("set COMFYUI_PATH to a ComfyUI checkout: the UNets are built by ComfyUI's own classes.", file=sys.stderr)
        return 2
    if a.json:  # the subprocess
        threads_for_real_size()
        run = measure_native if a.native else measure
        print("RESULT " + json.dumps(run(a.measure, a.res, a.steps, a.checkpointing)))
        return 0
    if a.measure:
        p = subprocess.run([sys.executable, __file__, "--json", "--measure", a.measure, "--res", str(a.res), "--steps",
                            str(a.steps), "--checkpointing", a.checkpointing] + (["--native"] if a.native else []),
                           capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
            return 1
        r = json.loads(line[7:])
        what = "ComfyUI's TrainLoraNode (LoRA on every weight, no CAT term)" if a.native else "CAT alpha 1"
        print(f"{r['kind']} shape, bf16 weights ({r['weights'] / GiB:.2f} GiB), {r['res']} px, {what}, batch 1, rank "
              f"16, compute {r['compute']}, checkpointing {'on' if r['checkpointing'] else 'off'}, {r['device']} "
              f"({r['memory']})")
        print(f"  measured growth during training   {r['growth'] / GiB:7.3f} GiB   ({r['step_s']:.2f} s/step)"
              + ("   [ComfyUI's TrainLoraNode]" if a.native else ""))
        if not a.native:
            print(f"  budget's prediction                {r['predicted'] / GiB:7.3f} GiB   (ratio measured/predicted "
                  f"{r['growth'] / r['predicted']:.2f})")
        print(f"  old in-place fp32 conversion added {r['fp32_conversion'] / GiB:7.3f} GiB   (ratio growth/conversion "
              f"{r['growth'] / r['fp32_conversion']:.2f})")
        return 0
    from native_vs_cat import boot

    boot()
    print("budget (GiB), bf16 weights + compute, CAT alpha 1, batch 1, rank 16 'attn'; total = weights + LoRA/AdamW + "
          "activations")
    print(f"{'model':11s} {'res':>5s} {'weights':>8s} {'LoRA+opt':>9s} {'act off':>8s} {'total off':>10s} "
          f"{'act on':>7s} {'total on':>9s}")
    import comfy.supported_models as sm

    newer = ["chroma", "qwen_image"] + (list(FLUX2_SIZES) if hasattr(sm, "Flux2") else [])  # v0.3.64: no Flux.2
    for kind, res in [("sd15", 512), ("sdxl", 1024), ("flux", 1024)] + [(k, 1024) for k in newer + list(NEW_FAMILIES)]:
        r = budget_row(kind, res)
        tot = lambda act: (r["weights"] + r["adapter"] + act) / GiB
        print(f"{kind:11s} {res:5d} {r['weights'] / GiB:8.2f} {r['adapter'] / GiB:9.3f} {r['act_off'] / GiB:8.2f} "
              f"{tot(r['act_off']):10.2f} {r['act_on'] / GiB:7.2f} {tot(r['act_on']):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
