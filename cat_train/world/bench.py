"""`python -m cat_train bench kps [--quick]`: the paper's Table 1 on a small world we control.

NOT Stable Diffusion: the base model is the 1.7M-parameter world model in `cat_train/world` (coloured
shapes, 32 px), scored by a world-CLIP trained on the same world. Methods, same steps and seeds:
plain LoRA (alpha 0), CAT (alpha 0.5, 1, 2; y = the class prompt), and DreamBooth-style prior
preservation (alpha 0; each step also fits one base-model sample of the class prompt: batch 2, half
identity, half prior, so its compute per step is about CAT's). APT (arXiv 2507.02687, cat_train/terms/apt.py):
`apt` (all three parts, alpha 0), `cat<alpha>+apt`, and one part alone: `apt:ada` (adaptive timestep-bin
weighting and augmentation), `apt:rs` (representation stabilization), `apt:aa` (attention alignment). Cheaper
preservation of a CAT method:
`/k<every>` and `/p<fraction>` suffixes (`cat1/k4`: the CAT term every 4th step, weighted 4α; `cat1/p0.5`: on half
the rows, weighted 2α; CatLossConfig.keep_every / keep_fraction), and `/local` (the layer-local keep estimator,
`/local:unit`, `/local:relative` naming the layer weights; CatLossConfig.keep_estimator, terms/keep_local.py).

Two tasks (`--task`): `novel` (default), an identity the base model never drew (a cyan/magenta striped circle with
a white dot); `reachable`, one the base model does draw but no prompt asks for (a small yellow circle in the
top-left corner: colour, shape, smallest size and a corner position of the training distribution; captions
never name size or position). The trigger, class word and captions are the same in both.

Per method and seed, fixed noise gives paired images: with the trigger ("a sks circle on a grey
background"), without it ("a circle on a grey background") and other classes ("a red square ...").
    PS, IS, KPS      the paper's scores with world-CLIP (KPS: adapted model, without vs with trigger)
    identity         share of trigger images drawn as the identity (novel: world-CLIP calls it 'striped';
                     reachable: it calls it yellow and the foreground's centre is within 4 px of the corner's)
    leak             share of tokenless circles drawn as the identity (the identity leaking into the class)
    drift, drift_other  mean of 1 - S_C(base image, adapted image), same noise, over the tokenless class
                     prompts / the other classes (0 = untouched). An arithmetic mean: one image that
                     changed completely must not decide the score, as it would in a harmonic mean.
    class/colour acc world-CLIP attribute heads on tokenless generations (did a circle stay a circle?)
    colour div       entropy of predicted colours of colour-free "a circle ..." prompts / ln 5 (mode collapse -> 0)
    <colour> <shape> per other class: share drawn with the prompted shape and colour (a collapsed neighbour shows here,
                     not in the mean)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..measure import metrics
from ..training.checks import OneLineParser, non_negative_float, output_folder, positive_float, positive_int
from ..adapters.lora import LoraSpec, remove_lora
from ..measure.sampling import sample
from ..terms.auto_config import AutoPreservationConfig
from ..training import CatLossConfig, Example, TrainConfig, build_examples, train
from . import generator as wg
from . import model as wm
from .catversion_bench import run_catversion
from .clip import load_clip
from .methods import apt_config, apt_method, cat_method, cheaper_options, label, method_name
from .runner import noise, run_seeds, summarize

NOTE = ("Controlled small world (procedural 32 px shapes, a 1.7M-parameter base model and a world-CLIP trained here), "
        "NOT Stable Diffusion: the numbers compare methods on this world only.")
CLASS = wg.IDENTITY_CLASS
OTHERS = [("red", "square"), ("blue", "triangle"), ("yellow", "star"), ("green", "cross"), ("purple", "circle")]
TASKS = ("novel", "reachable")
NEAR = 4.0  # px: the reachable identity's foreground centre must be this close to the corner's


@dataclass
class BenchConfig:
    steps: int = 400
    lr: float = 1e-3
    rank: int = 8
    # full: LoRA on attention and resnet convs. Attention-only rank 8 did not learn the striped texture in
    # 400 steps (seed 0: identity drawn in 0/6 to 2/6 trigger images, IS 0.0); full drew it in 6/6, IS 0.74.
    preset: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    per_prompt: int = 4          # images per background per prompt kind
    sample_steps: int = 20
    cfg: float = 3.0
    prior_images: int = 15
    methods: tuple[str, ...] = ("lora", "cat0.5", "cat1", "cat2", "prior")
    # APT's weights for the apt methods (the paper's values were not readable here). Calibrated once, on one
    # plain-LoRA APT run with all weights 1 (seed 0): the normalised stabilization penalty ran 0.002-0.01 and
    # the attention MSE 1e-5-5e-5 against a fit loss of 0.1-0.2, so 5 and 1000 put each at about a quarter of
    # the fit loss; the adaptive gain 1 lets the indicator (0.6 at the low-noise bins by step 400) act directly.
    apt_adaptive: float = 1.0
    apt_stabilize: float = 5.0
    apt_align: float = 1000.0
    # Auto preservation for the cat<alpha>:auto methods: the probes are the world's other class words, so y
    # starts as the class prompt alone and gains the neighbours the run itself finds drifting.
    # The budget is the list's size: which neighbours are kept is the threshold's call, not the budget's.
    auto_every: int = 50
    auto_top_k: int = 4
    auto_threshold: float = 0.01
    # cat<alpha>:nearest: no list given; the probes are the vocabulary's words the world's text encoder puts nearest to
    # "circle" (terms/nearest.py), measured from step `nearest_first` with the unit-free rule (terms/auto_checks.py): a
    # neighbour moving at least half as much as the kept class prompt is added. On seed 1 under cat1 every neighbour's
    # ratio was 0.51-0.81 at step 5 and 0.84-0.98 at step 50 (docs/auto-preservation.md): the measurement does not
    # single out the shapes that collapse, so the budget is the ranking's k and the ranking decides. every: auto's.
    nearest_k: int = 8
    nearest_threshold: float = 0.5
    nearest_first: int = 5
    task: str = "novel"


QUICK = dict(seeds=(0,), per_prompt=2, sample_steps=15, prior_images=6)  # same training as the full run, one seed


def _bgs(n: int) -> list[str]:
    return [bg for bg in wg.BACKGROUNDS for _ in range(n)]


def prompts(per: int) -> dict[str, list[str]]:
    bgs = _bgs(per)
    return {
        "token": [f"a {wg.TRIGGER} {CLASS} on a {bg} background" for bg in bgs],
        "notoken": [f"a {CLASS} on a {bg} background" for bg in bgs],
        "others": [f"a {c} {s} on a {bg} background" for (c, s) in OTHERS for bg in bgs[::max(1, per)]],
    }


class World:
    """Base model, text encoder, world-CLIP, and encode/generate helpers."""

    def __init__(self, base: str | Path = wm.BASE_WEIGHTS, clip: str | Path | None = None):
        self.den, self.text = wm.load_base(base)
        self.clip = load_clip(clip) if clip else load_clip()
        # APT's augmentations act on images: the world's latent is the pixel-unshuffled image
        self.den.augment_space = (lambda z: torch.nn.functional.pixel_shuffle(z, 2),
                                  lambda x: torch.nn.functional.pixel_unshuffle(x, 2))

    @torch.no_grad()
    def encode_text(self, ps: list[str]) -> dict:
        return {k: v.detach() for k, v in self.text.encode(ps).items()}

    def generate(self, ps: list[str], noise: torch.Tensor, c: BenchConfig, uncond: dict | None = None) -> torch.Tensor:
        """uncond: the unconditional branch's conditioning, when it is not "" as the encoder encodes it now."""
        z = sample(self.den, self.encode_text(ps), self.encode_text([""]) if uncond is None else uncond,
                   tuple(noise.shape), steps=c.sample_steps, cfg=c.cfg, noise=noise, clip_x0=1.0)
        return wm.decode(z)


def task_scenes(task: str = "novel") -> list[wg.Scene]:
    if task not in TASKS:
        raise ValueError(f"unknown bench task {task!r}; choose from {', '.join(TASKS)}.")
    return wg.identity_scenes() if task == "novel" else wg.reachable_scenes()


def task_images(task: str = "novel") -> torch.Tensor:
    return torch.from_numpy(wg.to_tensor_array(np.stack([wg.draw(s) for s in task_scenes(task)])))


def identity_items(task: str = "novel") -> list[tuple]:
    return [(wm.encode(im[None])[0], f"a {wg.TRIGGER} {CLASS} on a {s.background} background", (wg.TRIGGER,))
            for im, s in zip(task_images(task), task_scenes(task))]


def identity_parts(task: str, imgs: torch.Tensor, colours: list[str]) -> tuple[list[bool], list[bool]]:
    """Per image: (has the identity's colour/pattern, sits where the identity sits). Novel: the stripes, anywhere."""
    if task == "novel":
        return [c == "striped" for c in colours], [True] * len(colours)
    arr = ((imgs.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    centres = [wg.foreground_centre(a) for a in arr]
    return ([c == wg.REACHABLE["colour"] for c in colours],
            [math.hypot(x - wg.REACHABLE["cx"], y - wg.REACHABLE["cy"]) <= NEAR for x, y in centres])


def is_identity(task: str, imgs: torch.Tensor, colours: list[str]) -> list[bool]:
    """Per image: drawn as the task's identity (see the module docstring)."""
    return [a and b for a, b in zip(*identity_parts(task, imgs, colours))]


def trigger_positions(caption: str, triggers: tuple[str, ...]) -> tuple[int, ...]:
    """The world's tokenizer gives each word one token: the trigger's positions are its words' (align_skip_triggers)."""
    return tuple(i for i, w in enumerate(caption.lower().split()) if w in triggers)


def examples_for(method: str, world: World, c: BenchConfig, seed: int) -> tuple[list[Example], CatLossConfig, int]:
    if "/" in method:  # the base method with the CAT term on every k-th step and/or a fraction of rows
        base, every, fraction, local = cheaper_options(method)
        ex, lc, bs = examples_for(base, world, c, seed)
        return ex, replace(lc, keep_every=every, keep_fraction=fraction, **local), bs
    base, part = apt_method(method)
    if part is not None:  # the base method's examples and loss, with APT's parts switched on
        ex, lc, bs = examples_for(base, world, c, seed)
        return ex, replace(lc, apt=apt_config(part, c)), bs
    items = identity_items(c.task)
    if method == "lora":
        lc = CatLossConfig(alpha=0.0, preservation="class", class_word=CLASS)  # y unused at alpha 0
        return build_examples(items, world.encode_text, lc, token_positions=trigger_positions), lc, 1
    if method.startswith("cat"):
        alpha, mode = cat_method(method)
        auto = {"auto": auto_config, "nearest": nearest_config}.get(mode)
        lc = CatLossConfig(alpha=alpha, preservation="class" if mode in ("all", "auto", "nearest") else mode,
                           class_word=CLASS, auto=auto(c) if auto else AutoPreservationConfig())
        ex = build_examples(items, world.encode_text, lc, token_positions=trigger_positions)
        # each image once per world class as y: the CAT term keeps every class prompt, not only "a circle"
        if mode == "all":
            ys = {(s, sc.background): world.encode_text([f"a {s} on a {sc.background} background"])
                  for sc in task_scenes(c.task) for s in wg.SHAPES}
            ex = [replace(e, cond_pres={k: v[0] for k, v in ys[s, sc.background].items()})
                  for e, sc in zip(ex, task_scenes(c.task)) for s in wg.SHAPES]
        return ex, lc, 1
    if method == "prior":
        lc = CatLossConfig(alpha=0.0, preservation="class", class_word=CLASS)  # y unused at alpha 0
        bgs = [list(wg.BACKGROUNDS)[i % 3] for i in range(c.prior_images)]
        reg_prompts = [f"a {CLASS} on a {bg} background" for bg in bgs]
        reg = world.generate(reg_prompts, noise(c.prior_images, 500 + seed), c)  # the base model's own class images
        n_id, n_reg = len(items), len(reg_prompts)
        # repeats balance the draw: identity and prior are each picked half the time
        rows = [(*it, n_reg) for it in items] + [(wm.encode(r[None])[0], p, (), n_id) for r, p in zip(reg, reg_prompts)]
        return build_examples(rows, world.encode_text, lc, token_positions=trigger_positions), lc, 2
    raise ValueError(f"unknown method {method!r}; choose from lora, cat<alpha>[:class|strip|empty|all] (e.g. cat1, "
                     "cat1:all), prior.")


def auto_config(c: BenchConfig) -> AutoPreservationConfig:
    """cat<alpha>:auto's settings: the world's other shapes as probes ("a square on a grey background" for an image
    of "a sks circle on a grey background")."""
    return AutoPreservationConfig(every=c.auto_every, probes=tuple(s for s in wg.SHAPES if s != CLASS),
                                  top_k=c.auto_top_k, threshold=c.auto_threshold)


def nearest_config(c: BenchConfig) -> AutoPreservationConfig:
    """cat<alpha>:nearest's settings: no probe list, the world's class word alone."""
    return AutoPreservationConfig(every=c.auto_every, source="nearest", neighbours=c.nearest_k, top_k=c.nearest_k,
                                  threshold=c.nearest_threshold, rule="relative", first=c.nearest_first)


def subject_scores(world: World, imgs: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                   task: str = "novel") -> dict:
    """IS, KPS, drift, leak and identity: the scores that need only the images with ("token") and without
    ("notoken") the trigger, so a saved step can be scored without drawing the other classes."""
    clip = world.clip
    tok, notok = clip.encode_image(imgs["token"]), clip.encode_image(imgs["notoken"])
    ref = clip.encode_image(task_images(task))
    col_n = clip.attributes(imgs["notoken"])[1]
    colour_ok, place_ok = identity_parts(task, imgs["token"], clip.attributes(imgs["token"])[1])
    is_, kps = metrics.identity_similarity(ref, tok), metrics.kps(notok, tok)
    out = {"IS": is_.value, "KPS": kps.value,
           # pairs at the floor (similarity <= 0): one pulls IS's harmonic mean to 0 and KPS to 1; the demo says so
           "IS_floor": [is_.clamped, len(is_.per_pair)], "KPS_floor": [kps.clamped, len(kps.per_pair)],
           "drift": float((1 - metrics.cosine(clip.encode_image(base["notoken"]), notok)).mean()),
           "leak": float(np.mean(is_identity(task, imgs["notoken"], col_n))),
           "identity": float(np.mean([a and b for a, b in zip(colour_ok, place_ok)]))}
    # which half of the identity a method reaches: the colour a prompt can ask for, or the place
    if task == "reachable":
        out["id_colour"], out["id_place"] = float(np.mean(colour_ok)), float(np.mean(place_ok))
    return out


def evaluate(world: World, imgs: dict[str, torch.Tensor], base: dict[str, torch.Tensor], ps: dict[str, list[str]],
             task: str = "novel") -> dict:
    clip = world.clip
    subject = subject_scores(world, imgs, base, task)
    out = {
        "PS": metrics.prompt_similarity(clip.encode_text(ps["token"]), clip.encode_image(imgs["token"])).value,
        "IS": subject["IS"],
        "KPS": subject["KPS"],
        "drift": subject["drift"],
        "drift_other": float((1 - metrics.cosine(clip.encode_image(base["others"]),
                                                 clip.encode_image(imgs["others"]))).mean()),
    }
    shp_n, col_n = clip.attributes(imgs["notoken"])
    shp_o, col_o = clip.attributes(imgs["others"])
    want = [p.split()[1:3] for p in ps["others"]]
    right = sum(s == CLASS for s in shp_n) + sum(s == w[1] for s, w in zip(shp_o, want))
    out["class_acc"] = right / (len(shp_n) + len(shp_o))
    out["colour_acc"] = sum(cc == w[0] for cc, w in zip(col_o, want)) / len(col_o)
    counts = np.array([col_n.count(k) for k in wg.COLOURS], dtype=float)
    p = counts[counts > 0] / max(1.0, counts.sum())
    out["colour_div"] = max(0.0, float(-(p * np.log(p)).sum() / math.log(len(wg.COLOURS)))) if counts.sum() else 0.0
    out.update({k: subject[k] for k in ("leak", "identity", "id_colour", "id_place") if k in subject})
    for (colour, shape), col in zip(OTHERS, OTHER_COLUMNS):
        hits = [s == shape and cc == colour for s, cc, w in zip(shp_o, col_o, want) if w == [colour, shape]]
        out[col] = float(np.mean(hits))
    return out


def base_quality(world: World, per: int = 2, seed: int = 0, sample_steps: int = 15) -> dict[str, float]:
    """How well the base model draws its world, by world-CLIP's attribute heads on fixed noise.

    class_acc: share of tokenless class prompts ("a star on a black background") drawn as that class;
    colour_acc: share of "a <colour> <shape> on a grey background" drawn in that colour. Chance is 0.2 for both.
    """
    c = BenchConfig(sample_steps=sample_steps)
    cls = [f"a {s} on a {bg} background" for s in wg.SHAPES for bg in wg.BACKGROUNDS for _ in range(per)]
    col = [f"a {k} {s} on a grey background" for s in wg.SHAPES for k in wg.COLOURS]
    shp_cls, _ = world.clip.attributes(world.generate(cls, noise(len(cls), 900 + seed), c))
    shp_col, col_col = world.clip.attributes(world.generate(col, noise(len(col), 901 + seed), c))
    return {"class_acc": float(np.mean([a == p.split()[1] for a, p in zip(shp_cls, cls)])),
            "class_acc_with_colour": float(np.mean([a == p.split()[2] for a, p in zip(shp_col, col)])),
            "colour_acc": float(np.mean([a == p.split()[1] for a, p in zip(col_col, col)]))}


def run(c: BenchConfig, log=print, world: World | None = None, watch: Callable[..., dict] | None = None) -> dict:
    """watch(world, method, seed, examples, noise, base) -> {"save_every", "callback", "on_save"}: looks at a LoRA run
    through the trainer's own hooks (the demo's validation, previews and per-step scores), called just before it
    trains; noise and base are the evaluation's fixed noise and base-model images. Results are the same without it."""
    torch.manual_seed(0)
    world = world or World()
    ps = prompts(c.per_prompt)
    spec = LoraSpec(rank=c.rank, alpha=c.rank, preset=c.preset)
    t0 = time.time()

    def train_method(m, seed, noise, base):
        if m.startswith("catversion"):  # K/V embeddings in the text encoder, no LoRA: world/catversion_bench.py
            imgs, tr = run_catversion(world, m, c, seed, ps, noise, identity_items(c.task), CLASS)
            return imgs, tr, {}
        ex, lc, bs = examples_for(m, world, c, seed)
        hooks = dict(watch(world, m, seed, ex, noise, base)) if watch else {}
        tc = TrainConfig(steps=c.steps, lr=c.lr, seed=seed, batch_size=bs, save_every=hooks.pop("save_every", 0))
        reports, cb = {}, hooks.pop("callback", None)

        def callback(info, cb=cb):  # keeps the last reports (auto preservation's measuring time)
            reports.update(info.reports)
            if cb:
                cb(info)
        t2 = time.perf_counter()
        tr = train(world.den, ex, lc, spec, tc, keep_adapter=True, callback=callback, **hooks)
        train_seconds = time.perf_counter() - t2
        try:
            imgs = {k: world.generate(ps[k], noise[k], c) for k in ps}
        finally:
            remove_lora(world.den.module)
        # the training alone (sampling excluded): what a term costs per step
        extra = {"sec_per_step": train_seconds / max(1, tr.steps_done)}
        if "auto" in reports:  # of which the probe measurements
            extra["measure_sec_per_step"] = reports["auto"]["seconds"] / max(1, tr.steps_done)
        if "indicator" in tr.history[-1]:  # APT: how far its indicator rose (1 = the fit term switched off in that bin)
            seen = [v for v in tr.history[-1]["indicator"] if v is not None]
            extra["apt_indicator"], extra["apt_indicator_max"] = float(np.mean(seen)), float(np.max(seen))
        return imgs, tr, extra

    def added(tr) -> str:
        probes = tr.history[-1].get("auto_added") if tr.history else None
        near = (tr.history[-1].get("auto_nearest") if tr.history else None) or ()
        return ((f"  added {[(p, s, round(d, 4)) for p, s, d in probes]}" if probes is not None else "")
                + "".join(f"  nearest to {n['class_word']}: {n['probes']} ({n['seconds']:.1f}s)" for n in near))
    results, grid, trained = run_seeds(world, c, c.methods, ps, lambda imgs,
                                       base: evaluate(world, imgs, base, ps, c.task),
                                       train_method, lambda m: f"{label(m):24s}", log, note=added)
    return {"note": NOTE, "config": asdict(c), "seconds": time.time() - t0, "methods": summarize(results), "grid": grid,
            "trained": trained}


OTHER_COLUMNS = tuple(f"{c} {s}" for c, s in OTHERS)
COLUMNS = ("PS", "IS", "KPS", "identity", "leak", "drift", "drift_other", "class_acc", "colour_acc", "colour_div",
           *OTHER_COLUMNS)


def table(res: dict) -> str:
    n = len(res["config"]["seeds"])
    head = "| method | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    cell = (lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}") if n > 1 else (lambda s: f"{s['mean']:.3f}")
    rows = "".join(f"| {label(m)} | " + " | ".join(cell(s[k]) for k in COLUMNS) + " |\n"
                   for m, s in res["methods"].items())
    return (f"{NOTE}\n\n{head}{rows}\n(task {res['config'].get('task', 'novel')}; mean ± std over seeds "
            f"{list(res['config']['seeds'])}; {res['config']['steps']} steps, lr {res['config']['lr']}, rank "
            f"{res['config']['rank']} LoRA on {res['config']['preset']} layers)\n")


def save_grid(res: dict, path: Path, per_kind: int = 3, scale: int = 3) -> Path:
    """Rows: methods. Columns: with trigger | without trigger | other classes (seed 0)."""
    from PIL import Image, ImageDraw

    from ..measure.plot import font, text
    grid = res["grid"]
    f = font(13)
    names = {m: label(m).replace("α", "alpha") for m in grid}  # Pillow's embedded font has no α
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    s, pad, lw = 32 * scale, 4, 12 + int(max(measure.textlength(n, font=f) + 4 * n.count(" ") for n in names.values()))
    kinds = [("token", "with sks"), ("notoken", "without"), ("others", "other classes")]
    cols = [(k, i) for k, _ in kinds for i in range(per_kind)]
    W, H = lw + len(cols) * (s + pad) + 2 * pad, 20 + len(grid) * (s + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for j, (k, name) in enumerate(kinds):
        text(d, (lw + j * per_kind * (s + pad) + pad * j, 3), name, f, (0, 0, 0))
    for r, (m, imgs) in enumerate(grid.items()):
        y = 20 + r * (s + pad)
        text(d, (4, y + s // 2), names[m], f, (0, 0, 0), "lm")
        for j, (k, i) in enumerate(cols):
            t = imgs[k]
            idx = i * max(1, len(t) // per_kind)
            a = ((t[idx].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(a).resize((s, s), Image.NEAREST),
                         (lw + j * (s + pad) + pad * (j // per_kind), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write(res: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "kps_table.md", out / "kps.json"
    md.write_text(table(res))
    js.write_text(json.dumps({k: v for k, v in res.items() if k not in ("grid", "trained")}, indent=1))
    return {"table": md, "json": js, "grid": save_grid(res, out / "kps_grid.png")}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineParser(prog="python -m cat_train bench", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["kps"], help="kps: this benchmark; `bench masked` is masked training "
                    "(world/masked_bench.py, `bench masked --help`)")
    ap.add_argument("--quick", action="store_true", help="one seed, fewer images (< 5 min on CPU)")
    ap.add_argument("--task", choices=TASKS, help="novel (default): an identity the base never drew; reachable: one it "
                    "draws but no prompt asks for")
    ap.add_argument("--out", default="bench_out", type=output_folder)
    ap.add_argument("--steps", type=positive_int)
    ap.add_argument("--lr", type=positive_float)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--methods", nargs="+", type=method_name)
    ap.add_argument("--per-prompt", type=positive_int)
    ap.add_argument("--sample-steps", type=positive_int)
    ap.add_argument("--rank", type=positive_int)
    ap.add_argument("--preset", choices=["attn", "attn_ff", "full"])
    ap.add_argument("--apt-adaptive", type=non_negative_float, help="APT adaptive gain of the apt methods (default 1)")
    ap.add_argument("--apt-stabilize", type=non_negative_float, help="APT stabilization weight (default 5)")
    ap.add_argument("--apt-align", type=non_negative_float, help="APT attention-alignment weight (default 1000)")
    ap.add_argument("--auto-every", type=positive_int, help="auto methods: measure the probes every N steps (default "
                                                            "50)")
    ap.add_argument("--auto-top-k", type=positive_int, help="auto methods: probes added at most (default 4)")
    ap.add_argument("--auto-threshold", type=non_negative_float, help=
            "auto methods: keep drift a probe must pass (default 0.01)")
    ap.add_argument("--nearest-k", type=positive_int, help="nearest methods: probes ranked from the class word "
                                                           "(default 8)")
    ap.add_argument("--nearest-threshold", type=non_negative_float,
                    help="nearest methods: drift over the kept class prompt's a probe must pass (default 0.5)")
    ap.add_argument("--nearest-first", type=int, help="nearest methods: first measurement step, doubling to "
                                                      "--auto-every (default 5; 0 = at every)")
    a = ap.parse_args(argv)  # every argument checked here: the run takes minutes and writes only at its end
    kw = dict(QUICK) if a.quick else {}
    for k in ("steps", "lr", "seeds", "methods", "per_prompt", "sample_steps", "rank", "preset", "apt_adaptive",
              "apt_stabilize", "apt_align",
              "auto_every", "auto_top_k", "auto_threshold", "nearest_k", "nearest_threshold", "nearest_first", "task"):
        v = getattr(a, k)
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, list) else v
    c = BenchConfig(**kw)
    print(NOTE)
    res = run(c)
    paths = write(res, Path(a.out))
    print("\n" + table(res))
    print(f"wrote {paths['table']}, {paths['json']}, {paths['grid']} in {res['seconds']:.0f}s")
    return 0
