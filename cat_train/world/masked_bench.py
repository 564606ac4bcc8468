"""`python -m cat_train bench masked`: does masked training stop a LoRA from learning the backgrounds?

NOT Stable Diffusion: the world model of `cat_train/world` (docs/world-bench.md). The task: the world's identity
(the striped circle, trigger `sks`) in 5 images, each on a cluttered background the world never draws (a checkerboard
of two random colours, 4 px cells, new colours per image), captioned "a sks circle" (the clutter has no word). The
subject's mask is exact: the renderer's own shape mask. Methods (same steps, seeds, noise): `lora` and `cat<α>`, each
optionally `+mask` (fit weighted by the mask, background weight `--mask-floor`) and `+keep` (the background keep
term, weight `--mask-keep`: outside the mask the adapted y_T prediction is pulled to the frozen one).

Scores on fixed noise (per background, `--per-prompt` images each):
    identity       share of "a sks circle on a <bg> background" images world-CLIP calls striped
    bg_err         "a sks circle on a <bg> background": per image the median over the outer 3-px ring of the mean
                   |pixel - the prompted background colour| (0-1 scale), averaged; the base model's is the floor
    bg_ok          share of those images whose ring median error is under 0.1 (a plain background of the asked colour)
    bg_plain       "a sks circle" (no background asked): share whose ring is one of the world's plain backgrounds
                   (median error under 0.1 to the nearest); clutter learned from the images shows here
    class_bg_err   bg_err of the tokenless "a circle on a <bg> background" (the clutter leaking into the class)
    drift          mean 1 - cosine(world-CLIP of base, of adapted) over the tokenless images, same noise
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters.lora import LoraSpec, remove_lora
from ..data.masks import latent_mask
from ..measure import metrics
from ..training import CatLossConfig, TrainConfig, build_examples, train
from ..training.checks import non_negative_float, output_folder, positive_float, positive_int
from . import generator as wg
from . import model as wm
from .runner import run_seeds, summarize

CAPTION = f"a {wg.TRIGGER} {wg.IDENTITY_CLASS}"
RING = 3      # px: the border ring whose colour is the background's
OK = 0.1      # ring median error (0-1) under which a background counts as the plain asked colour


@dataclass
class MaskedBenchConfig:
    steps: int = 400
    lr: float = 1e-3
    rank: int = 8
    preset: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    per_prompt: int = 4
    sample_steps: int = 20
    cfg: float = 3.0
    mask_floor: float = 0.1
    mask_keep: float = 1.0
    methods: tuple[str, ...] = ("lora", "lora+mask", "cat1", "cat1+mask", "cat1+mask+keep")


QUICK = dict(seeds=(0,), per_prompt=2, sample_steps=15)


def clutter(i: int, seed: int = 77) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a checkerboard of two random colours, 4 px cells; image i's own colours."""
    rng = np.random.default_rng(seed * 1000 + i)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    y, x = np.mgrid[0:wg.SIZE, 0:wg.SIZE]
    return np.where((((x // 4) + (y // 4)) % 2 == 0)[..., None], a, b).astype(np.uint8)


def task() -> tuple[np.ndarray, np.ndarray]:
    """The 5 training images (5, SIZE, SIZE, 3) uint8 and their subject masks (5, SIZE, SIZE) float."""
    imgs, masks = [], []
    for i, s in enumerate(wg.identity_scenes()):
        img, m = wg.draw(s), wg.mask(s.shape, s.cx, s.cy, s.r)
        imgs.append(np.where(m[..., None], img, clutter(i)))
        masks.append(m.astype(np.float32))
    return np.stack(imgs), np.stack(masks)


def parse(method: str) -> tuple[float, bool, bool]:
    """'cat1+mask+keep' -> (1.0, True, True): CAT factor, mask weighting, background keep."""
    base, *parts = method.split("+")
    if base == "lora":
        alpha = 0.0
    elif base.startswith("cat"):
        alpha = float(base[3:])
    else:
        raise ValueError(f"unknown method {method!r}; lora or cat<alpha>, each optionally +mask and +keep.")
    if set(parts) - {"mask", "keep"} or len(set(parts)) != len(parts):
        raise ValueError(f"unknown method {method!r}; lora or cat<alpha>, each optionally +mask and +keep.")
    return alpha, "mask" in parts, "keep" in parts


def method_name(m: str) -> str:
    try:
        parse(m)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return m


def loss_config(method: str, c: MaskedBenchConfig) -> CatLossConfig:
    alpha, mask, keep = parse(method)
    return CatLossConfig(alpha=alpha, preservation="class", class_word=wg.IDENTITY_CLASS,
                         mask_floor=c.mask_floor if mask else 1.0, mask_keep=c.mask_keep if keep else 0.0)


def prompts(per: int) -> dict[str, list[str]]:
    bgs = [bg for bg in wg.BACKGROUNDS for _ in range(per)]
    return {"named": [f"{CAPTION} on a {bg} background" for bg in bgs], "plain": [CAPTION] * len(bgs),
            "class": [f"a {wg.IDENTITY_CLASS} on a {bg} background" for bg in bgs]}


def ring_error(imgs: torch.Tensor, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """Per image, per candidate colour: median over the border ring of mean |pixel - colour| on a 0-1 scale."""
    a = ((imgs.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255)
    y, x = np.mgrid[0:wg.SIZE, 0:wg.SIZE]
    ring = np.minimum(np.minimum(x, y), np.minimum(wg.SIZE - 1 - x, wg.SIZE - 1 - y)) < RING
    px = a[:, ring]  # (n, ring pixels, 3)
    return np.stack([np.median(np.abs(px - np.array(col)).mean(-1), 1) / 255 for col in colours], 1)


def evaluate(world, imgs: dict[str, torch.Tensor], base: dict[str, torch.Tensor], ps: dict[str, list[str]]) -> dict:
    bg_of = [p.split(" on a ")[1].split()[0] for p in ps["named"]]
    named = ring_error(imgs["named"], [wg.BACKGROUNDS[b] for b in wg.BACKGROUNDS])
    want = np.array([list(wg.BACKGROUNDS).index(b) for b in bg_of])
    err = named[np.arange(len(want)), want]
    plain = ring_error(imgs["plain"], list(wg.BACKGROUNDS.values())).min(1)
    cls = ring_error(imgs["class"], [wg.BACKGROUNDS[b] for b in wg.BACKGROUNDS])[np.arange(len(want)), want]
    colours = world.clip.attributes(imgs["named"])[1]
    clip = world.clip
    return {"identity": float(np.mean([c == "striped" for c in colours])), "bg_err": float(err.mean()),
            "bg_ok": float((err < OK).mean()), "bg_plain": float((plain < OK).mean()),
            "class_bg_err": float(cls.mean()),
            "drift": float((1 - metrics.cosine(clip.encode_image(base["class"]),
                                               clip.encode_image(imgs["class"]))).mean())}


COLUMNS = ("identity", "bg_err", "bg_ok", "bg_plain", "class_bg_err", "drift", "final_fit")


def label(m: str, c: MaskedBenchConfig) -> str:
    if m == "base":
        return "base (no adapter)"
    alpha, mask, keep = parse(m)
    name = "LoRA (α=0)" if alpha == 0 else f"CAT (α={alpha:g})"
    extra = ([f"mask floor {c.mask_floor:g}"] if mask else []) + ([f"background keep {c.mask_keep:g}"] if keep else [])
    return name + (f", {', '.join(extra)}" if extra else "")


def run(c: MaskedBenchConfig, log=print) -> dict:
    from .bench import World

    torch.manual_seed(0)
    world = World()
    imgs, masks = task()
    x = torch.from_numpy(wg.to_tensor_array(imgs))
    items = [(wm.encode(im[None])[0], CAPTION, (wg.TRIGGER,), 1, latent_mask(torch.from_numpy(m), wm.LATENT_SHAPE[1:]))
             for im, m in zip(x, masks)]
    ps = prompts(c.per_prompt)
    spec = LoraSpec(rank=c.rank, alpha=c.rank, preset=c.preset)
    t0 = time.time()

    def train_method(m, seed, noise, base):
        lc = loss_config(m, c)
        ex = build_examples(items, world.encode_text, lc)
        tr = train(world.den, ex, lc, spec, TrainConfig(steps=c.steps, lr=c.lr, seed=seed), keep_adapter=True)
        try:
            return {k: world.generate(ps[k], noise[k], c) for k in ps}, tr, {}
        finally:
            remove_lora(world.den.module)
    results, grid, _ = run_seeds(world, c, c.methods, ps, lambda out, base: evaluate(world, out, base, ps),
                                 train_method,
                                 lambda m: f"{label(m, c):45s}", log, noise_offset=3000,
                                 base_row={"final_fit": float("nan")})
    return {"config": asdict(c), "seconds": time.time() - t0, "methods": summarize(results), "grid": grid,
            "train_images": x, "masks": masks}


def table(res: dict) -> str:
    c = MaskedBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["config"].items()})
    n = len(c.seeds)
    head = "| method | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"

    def cell(s):
        if s["mean"] != s["mean"]:
            return "–"
        return f"{s['mean']:.3f} ± {s['std']:.3f}" if n > 1 else f"{s['mean']:.3f}"
    rows = "".join(f"| {label(m, c)} | " + " | ".join(cell(s[k]) for k in COLUMNS) + " |\n"
                   for m, s in res["methods"].items())
    return (f"{head}{rows}\n(masked-background task; mean ± std over seeds {list(c.seeds)}; {c.steps} steps, lr "
            f"{c.lr}, rank {c.rank} LoRA on {c.preset} layers; {c.per_prompt} images per background and prompt kind)\n")


def save_grid(res: dict, path: Path, per_kind: int = 3, scale: int = 3) -> Path:
    """Row 0: the training images and their masks; then per method (seed 0): named | plain | class prompts."""
    from PIL import Image

    s, pad = 32 * scale, 4
    rows = [("train", None)] + list(res["grid"].items())
    kinds = ("named", "plain", "class")
    W, H = 3 * per_kind * (s + pad) + 3 * pad, len(rows) * (s + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))

    def paste(t, col, row):
        a = ((t.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        canvas.paste(Image.fromarray(a).resize((s, s), Image.NEAREST),
                     (col * (s + pad) + pad * (col // per_kind), row * (s + pad)))
    for i, t in enumerate(res["train_images"]):
        paste(t, i, 0)
    for i, m in enumerate(res["masks"][:9 - len(res["train_images"])]):
        paste(torch.from_numpy(m)[None].repeat(3, 1, 1) * 2 - 1, len(res["train_images"]) + i, 0)
    for r, (_, imgs) in enumerate(rows[1:], 1):
        for j, k in enumerate(kinds):
            t = imgs[k]
            for i in range(per_kind):
                paste(t[i * max(1, len(t) // per_kind)], j * per_kind + i, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write(res: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "masked_table.md", out / "masked.json"
    md.write_text(table(res))
    js.write_text(json.dumps({k: v for k, v in res.items() if k in ("config", "seconds", "methods")}, indent=1))
    return {"table": md, "json": js, "grid": save_grid(res, out / "masked_grid.png")}


def main(argv: list[str] | None = None) -> int:
    from ..training.checks import OneLineParser

    ap = OneLineParser(prog="python -m cat_train bench masked", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 2 images per background and prompt kind, 15 "
                                                         "sampling steps")
    ap.add_argument("--out", default="bench_out", type=output_folder)
    ap.add_argument("--steps", type=positive_int)
    ap.add_argument("--lr", type=positive_float)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--methods", nargs="+", type=method_name,
                    help="lora or cat<alpha>, each optionally +mask and +keep (default: lora lora+mask cat1 cat1+mask "
                         "cat1+mask+keep)")
    ap.add_argument("--per-prompt", type=positive_int)
    ap.add_argument("--sample-steps", type=positive_int)
    ap.add_argument("--rank", type=positive_int)
    ap.add_argument("--preset", choices=["attn", "attn_ff", "full"])
    ap.add_argument("--mask-floor", type=non_negative_float, help=
            "+mask methods: fit weight of the background (default 0.1)")
    ap.add_argument("--mask-keep", type=non_negative_float, help="+keep methods: background keep weight (default 1)")
    a = ap.parse_args(argv)
    kw = dict(QUICK) if a.quick else {}
    for k in ("steps", "lr", "seeds", "methods", "per_prompt", "sample_steps", "rank", "preset", "mask_floor",
            "mask_keep"):
        v = getattr(a, k)
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, list) else v
    c = MaskedBenchConfig(**kw)
    res = run(c)
    paths = write(res, Path(a.out))
    print("\n" + table(res))
    print(f"wrote {paths['table']}, {paths['json']}, {paths['grid']} in {res['seconds']:.0f}s")
    return 0
