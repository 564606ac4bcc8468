"""`python -m cat_train demo --out DIR`: the main job on an embedded default, no ComfyUI, no download.

The embedded model is a small SD-architecture UNet (pixel space, 32 px, random weights from a
fixed seed) with a toy word-embedding text encoder: NOT Stable Diffusion and not pretrained. It
shows the mechanics and the one number CAT is about: how far the adapter moves the model's
predictions for prompts WITHOUT the trigger ("drift"), plain LoRA (alpha 0) against CAT (alpha 1).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .adapter import LoraSpec, adapter_disabled, inject_lora, load_lora_weights, remove_lora
from .denoiser import ModuleDenoiser
from .export import ldm_to_diffusers, next_free_path, save_lora, to_kohya, training_metadata
from .loss import CatLossConfig
from .plot import loss_curve
from .toytext import HashTextEncoder
from .train import StepInfo, TrainConfig, build_examples, train
from .unet import UNet

DEMO_UNET = dict(in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                 transformer_depth=(1, 1), context_dim=64, num_heads=2)
TRIGGER, CLASS_WORD = "sks", "toy"
PROBE_PROMPTS = ["a photo of toy", "a photo of a dog", "a red circle on a grey background", ""]


def identity_images(n: int = 5, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """A disc with orange/teal stripes and a white dot, in different places: the identity to learn."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    orange, teal = torch.tensor([0.88, -0.06, -0.84]), torch.tensor([-1.0, 0.25, 0.25])
    out = []
    for _ in range(n):
        cx, cy = (int(torch.randint(10, size - 10, (1,), generator=g)) for _ in range(2))
        r2 = (xx - cx) ** 2 + (yy - cy) ** 2
        img = torch.zeros(3, size, size)  # grey background is 0 in [-1, 1]
        stripes = torch.where(((yy - cy) // 3 % 2 == 0)[None], orange[:, None, None], teal[:, None, None])
        img = torch.where((r2 <= 81)[None], stripes, img)
        out.append(torch.where((r2 <= 4)[None], torch.ones(3, 1, 1), img))
    return out


def drift(denoiser: ModuleDenoiser, text: HashTextEncoder, prompts: list[str], seed: int = 123, n: int = 8) -> float:
    """Mean squared change of the prediction that the adapter causes for prompts without the trigger."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n * len(prompts), 3, 32, 32, generator=g) * 2 - 1
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (x0.shape[0],), generator=g)
    cond = text([p for p in prompts for _ in range(n)])
    x_t = denoiser.schedule.add_noise(x0, noise, t)
    with torch.no_grad():
        adapted = denoiser.predict(x_t, t, cond)
        with adapter_disabled(denoiser.module):
            frozen = denoiser.predict(x_t, t, cond)
    return float((adapted - frozen).pow(2).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created; existing files are never overwritten)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--alpha", type=float, default=1.0, help="CAT factor of the CAT run (the other run is alpha 0)")
    ap.add_argument("--lr", type=float, default=1e-3, help="higher than the paper's 1e-4: the demo has 150 steps, not 600")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("Embedded model: a small SD-architecture UNet (pixel space, 32 px, "
          f"{sum(p.numel() for p in UNet(**DEMO_UNET).parameters()):,} parameters, random weights from seed {args.seed}) "
          "with a toy word-embedding text encoder. Not Stable Diffusion, not pretrained: this demo shows the mechanics "
          "and measures how much each adapter moves predictions for prompts without the trigger.")
    torch.manual_seed(args.seed)
    denoiser = ModuleDenoiser(UNet(**DEMO_UNET))
    text = HashTextEncoder(dim=DEMO_UNET["context_dim"])
    images = identity_images(seed=args.seed)
    items = [(img, f"a photo of {TRIGGER} {CLASS_WORD}", (TRIGGER,)) for img in images]
    spec = LoraSpec(rank=8, alpha=8)
    report: dict = {"model": "embedded demo UNet (not SD, not pretrained)", "unet_config": DEMO_UNET,
                    "trigger": TRIGGER, "class_word": CLASS_WORD, "images": len(images), "steps": args.steps, "runs": {}}
    histories = {}
    for alpha in (0.0, args.alpha):
        loss_cfg = CatLossConfig(alpha=alpha, preservation="class", class_word=CLASS_WORD)
        cfg = TrainConfig(steps=args.steps, lr=args.lr, batch_size=2, seed=args.seed)
        examples = build_examples(items, text, loss_cfg)
        name = "lora" if alpha == 0 else "cat"
        t0 = time.perf_counter()

        def progress(info: StepInfo, name=name) -> None:
            if info.step == 1 or info.step % 25 == 0 or info.step == info.total:
                print(f"  [{name} alpha={alpha:g}] step {info.step:4d}/{info.total}  fit {info.fit:.4f}  "
                      f"keep {info.keep:.2e}  {info.step / max(info.elapsed, 1e-9):.1f} it/s", flush=True)

        result = train(denoiser, examples, loss_cfg, spec, cfg, callback=progress)
        seconds = time.perf_counter() - t0
        inject_lora(denoiser.module, spec)
        load_lora_weights(denoiser.module, result.weights)
        d_probe = drift(denoiser, text, PROBE_PROMPTS)
        d_token = drift(denoiser, text, [f"a photo of {TRIGGER} {CLASS_WORD}"])
        remove_lora(denoiser.module)
        path = out / f"demo_{name}.safetensors"
        path = next_free_path(out, path.stem) if path.exists() else path  # never overwrite an earlier run
        meta = training_metadata(cat_factor=alpha, triggers=[TRIGGER], preservation="class", class_word=CLASS_WORD,
                                 steps=args.steps, rank=spec.rank, alpha=spec.alpha, lr=args.lr, seed=args.seed,
                                 num_images=len(images), resolution=32, target_preset=spec.preset,
                                 base_model="cat_train demo UNet", output_name=path.stem)
        names = ldm_to_diffusers(n for n, _ in denoiser.module.named_modules())
        save_lora(path, to_kohya(result.weights, names), meta)
        histories[name] = result.history
        report["runs"][name] = {"alpha": alpha, "seconds": round(seconds, 1), "final_fit": result.history[-1]["fit"],
                                "drift_without_trigger": d_probe, "change_with_trigger": d_token,
                                "lora": str(path)}
    lora, cat = report["runs"]["lora"], report["runs"]["cat"]
    report["drift_ratio_cat_over_lora"] = cat["drift_without_trigger"] / max(lora["drift_without_trigger"], 1e-30)
    curve = loss_curve([{"step": a["step"], "fit (lora)": a["fit"], "fit (cat)": b["fit"], "keep (cat)": b["keep"]}
                        for a, b in zip(histories["lora"], histories["cat"])],
                       keys=("fit (lora)", "fit (cat)", "keep (cat)"), title="CAT demo: fit and keep terms")
    curve.save(out / "loss_curve.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nwithout the trigger, predictions moved by (mean squared change):\n"
          f"  plain LoRA (alpha 0): {lora['drift_without_trigger']:.3e}\n"
          f"  CAT (alpha {args.alpha:g}):      {cat['drift_without_trigger']:.3e}   ({report['drift_ratio_cat_over_lora']:.2f}x of LoRA)\n"
          f"with the trigger: LoRA {lora['change_with_trigger']:.3e}, CAT {cat['change_with_trigger']:.3e}\n"
          f"wrote {lora['lora']}, {cat['lora']}, {out / 'loss_curve.png'}, {out / 'report.json'}")
    return 0
