"""ComfyUI's native TrainLoraNode vs ComfyUI-CAT (alpha 0 and alpha 1): step time and peak memory.

Same ComfyUI-built UNet (random weights from one seed), same latents, same rank, AdamW, batch 1,
fp32, no gradient checkpointing. Each method runs in its own subprocess so peak memory is its own.
Step time: native = (time for 1+N steps - time for 1 step) / N (its loop has no per-step hook);
ours = time between the callbacks of step 1 and step 1+N. Memory: CUDA peak allocated on GPU, else
peak RSS (ru_maxrss) and its growth over the process after the model was built.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/native_vs_cat.py --unet sd15 --res 256 --steps 4

`cheap` is CAT with the CAT term every --keep-every steps (α scaled by it; CatLossConfig.keep_every), timed over
whole cycles; `local` is CAT with the layer-local keep estimator (CatLossConfig.keep_estimator "local"). Measured
on the shared 2-core CPU machine, 1 torch thread, ComfyUI a125cd84, one run each:
  SD1.5 UNet shape (859,520,964 params), 256 px, rank 16, 2 timed steps (--unet sd15 --res 256 --steps 2 --threads 1):
    native TrainLoraNode   20.44 s/step  peak RSS 9412 MB
    CAT alpha=0             8.30 s/step  peak RSS 5197 MB   -> 2.46x steps/s, 0.55x peak memory
    CAT alpha=1            19.06 s/step  peak RSS 6397 MB   -> 1.07x steps/s, 0.68x peak memory
  tiny UNet (1.08M params), 64 px, 10 timed steps: native 0.124 s, alpha=0 0.071 s (1.75x), alpha=1 0.104 s (1.20x);
    peak RSS 822 / 835 / 848 MB (the import of peft accounts for the small growth at this size).
  With the local estimator (--methods native ours0 local, load average 9-10): alpha=0 15.35 s/step, peak RSS 5116 MB;
    local 21.47 s/step, 5143 MB (1.40x our plain step; 27 MB above it, where exact CAT adds ~1 GB); the native row's
    time (1+N minus 1 step runs) came out at 0.49 s under that load, not a step time (docs/benchmarks.md).
No GPU was lent to this session, so there are no GPU figures.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 use_temporal_attention=False, use_temporal_resblock=False)
TINY_UNET = dict(SD15_UNET, model_channels=32, num_res_blocks=[1, 1], transformer_depth=[1, 1], channel_mult=[1, 2],
                 context_dim=64, transformer_depth_output=[1, 1, 1, 1])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def boot():
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (the native trainer is part of ComfyUI).")
    sys.path.insert(0, comfy_path)
    import torch
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()
    import utils.install_util  # noqa: F401  (keep ComfyUI's utils package ahead of comfy/utils.py)


def build(kind: str):
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg_dict = SD15_UNET if kind == "sd15" else TINY_UNET

    class Cfg(sm.SD15):
        unet_config = {}
        unet_extra_config = {"num_heads": 8, "num_head_channels": -1} if kind == "sd15" else {"num_heads": 2,
                "num_head_channels": -1}

    cfg = Cfg(cfg_dict)
    cfg.set_inference_dtype(torch.float32, None)
    base = cfg.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in base.diffusion_model.named_parameters():
            p.copy_(torch.randn(p.shape,
                                generator=g) * (0.01 if n.endswith("bias") else min(0.05, max(1, p[0].numel()) ** -0.5))
                    if p.ndim > 1 or n.endswith("bias") else 1 + torch.randn(p.shape, generator=g) * 0.01)
    mp = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                          offload_device=mm.unet_offload_device())
    return mp, cfg_dict["context_dim"]


def data(res: int, ctx_dim: int):
    import torch
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, res // 8, res // 8, generator=g)
    return lat, torch.randn(1, 77, ctx_dim, generator=g), torch.randn(1, 77, ctx_dim, generator=g)


def peak(torch) -> dict:
    if torch.cuda.is_available():
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20, "memory": "cuda max allocated"}
    return {"peak_mb": rss_mb(), "memory": "peak RSS"}


def run_native(kind, res, steps, rank) -> dict:
    import torch
    import comfy_extras.nodes_train as nt

    mp, ctx_dim = build(kind)
    base_rss = rss_mb()
    lat, ctx, _ = data(res, ctx_dim)
    node = nt.TrainLoraNode()

    def go(n):
        t = time.perf_counter()
        with torch.inference_mode(False):
            node.train(mp, {"samples": lat}, [[ctx, {}]], 1, n, 1, 1e-4, rank, "AdamW", "MSE", 0, "fp32", "fp32",
                       "LoRA",
                       False, "[None]")
        return time.perf_counter() - t

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t1 = go(1)
    tn = go(1 + steps)
    return {"method": "native TrainLoraNode", "step_s": (tn - t1) / steps, "base_rss_mb": base_rss, **peak(torch)}


def run_ours(kind, res, steps, rank, alpha, every=1, estimator="exact") -> dict:
    import torch

    spec = importlib.util.spec_from_file_location("comfyui_cat", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_cat"] = pack
    spec.loader.exec_module(pack)
    from comfyui_cat.cat_train.adapters.lora import LoraSpec
    from comfyui_cat.cat_train.training import CatLossConfig, Example, TrainConfig, train
    from comfyui_cat.nodes.comfy_model import trainable

    mp, ctx_dim = build(kind)
    base_rss = rss_mb()
    lat, ctx_t, ctx_p = data(res, ctx_dim)
    examples = [Example(lat[i], {"context": ctx_t[0]}, {"context": ctx_p[0]}) for i in range(len(lat))]
    stamps = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    steps = -(-steps // every) * every  # keep_every: whole cycles after the first step (which has the CAT term)
    with torch.inference_mode(False), trainable(mp) as den:
        train(den, examples, CatLossConfig(alpha=alpha, preservation="empty", keep_every=every,
                                           keep_estimator=estimator),
              LoraSpec(rank=rank, alpha=rank),
              TrainConfig(steps=1 + steps, lr=1e-4), callback=lambda info: stamps.append(time.perf_counter()))
    name = f"ComfyUI-CAT alpha={alpha:g}" + (f" keep_every={every}" if every > 1 else "") + \
        (f" keep_estimator={estimator}" if estimator != "exact" else "")
    return {"method": name, "step_s": (stamps[-1] - stamps[0]) / steps, "base_rss_mb": base_rss, **peak(torch)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unet", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--keep-every", type=int, default=4, help="the cheaper CAT row: the CAT term every N-th step "
                                                              "(keep_every)")
    rows = ["native", "ours0", "ours1", "cheap", "local"]
    ap.add_argument("--methods", nargs="+", choices=rows, default=rows,
                    help="rows to run (native is always run first: the others compare with it); local: CAT with the "
                         "layer-local keep estimator (keep_estimator local)")
    ap.add_argument("--one", choices=rows, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        import torch
        if a.threads:
            torch.set_num_threads(a.threads)
        boot()
        r = run_native(a.unet, a.res, a.steps, a.rank) if a.one == "native" else \
            run_ours(a.unet, a.res, a.steps, a.rank, 0.0 if a.one == "ours0" else 1.0,
                     a.keep_every if a.one == "cheap" else 1, "local" if a.one == "local" else "exact")
        print("RESULT " + json.dumps(r))
        return 0
    rows = []
    for which in dict.fromkeys(["native", *a.methods]):
        cmd = [sys.executable, __file__, "--one", which, "--unet", a.unet, "--res", str(a.res), "--steps", str(a.steps),
               "--rank", str(a.rank), "--threads", str(a.threads), "--keep-every", str(a.keep_every)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
            return 1
        rows.append(json.loads(line[7:]))
    print(f"UNet {a.unet}, {a.res}px, batch 1, rank {a.rank}, {a.steps} timed steps, fp32, "
          f"{'GPU' if 'cuda' in rows[0]['memory'] else 'CPU'} ({rows[0]['memory']})")
    print(f"{'method':34s} {'step s':>9s} {'steps/s':>9s} {'peak MB':>9s} {'growth MB':>10s}")
    for r in rows:
        growth = r["peak_mb"] - r["base_rss_mb"] if "RSS" in r["memory"] else r["peak_mb"]
        r["growth_mb"] = growth
        print(f"{r['method']:34s} {r['step_s']:9.4f} {1 / r['step_s']:9.2f} {r['peak_mb']:9.0f} {growth:10.0f}")
    nat = rows[0]
    for r in rows[1:]:
        print(f"{r['method']} vs native: {nat['step_s'] / r['step_s']:.2f}x steps/s, "
              f"{r['peak_mb'] / nat['peak_mb']:.2f}x peak memory, {r['growth_mb'] / max(nat['growth_mb'], 1e-9):.2f}x "
              "memory growth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
