"""Bit-identity of training across a refactor: run it at two commits, compare the printed lines (diff them).

    OMP_NUM_THREADS=1 python benchmarks/identity.py > before.txt   # at the old commit
    OMP_NUM_THREADS=1 python benchmarks/identity.py > after.txt    # at the new one
    diff before.txt after.txt                                       # no output: the same bits

Runs on the embedded world model (no download): the demo's two trainings (plain LoRA and CAT α = 1, 400 steps, seed 0)
and its score table, then short runs with each plug-in on: APT (all three parts), auto preservation, masks with the
background keep term, min-SNR with a timestep range, caption dropout and tag shuffling, cheaper preservation, EMA,
LoHa, and CatVersion + CAT. Per run it prints the sha256 of the loss history (every float's repr), of the weights
(every tensor's bytes, by name), the run id its checkpoint folder records (what a resume compares) and of the
step terms' LoRA-header settings. About 4 minutes on one CPU thread.

The script runs at any commit since the package was split into parts: each name is looked up where the layout of
that commit has it (`pick`), newest place first.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pick(name: str, *modules: str):
    """`name` from the first of these modules that has it (the layouts of different commits)."""
    for m in modules:
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} is in none of {modules}")


train = pick("train", "cat_train.training.loop", "cat_train.train")
TrainConfig = pick("TrainConfig", "cat_train.training.config", "cat_train.training.loop", "cat_train.train")
build_examples = pick("build_examples", "cat_train.training.examples", "cat_train.training.loop",
                      "cat_train.train")
CatLossConfig = pick("CatLossConfig", "cat_train.training.config", "cat_train.step.objective", "cat_train.loss")
LoraSpec = pick("LoraSpec", "cat_train.adapters.lora", "cat_train.lora")
remove_lora = pick("remove_lora", "cat_train.adapters.lora", "cat_train.lora")
AptConfig = pick("AptConfig", "cat_train.terms.apt_config", "cat_train.apt_config")
latent_mask = pick("latent_mask", "cat_train.data.masks", "cat_train.terms.mask", "cat_train.mask")
train_catversion = pick("train_catversion", "cat_train.training.catversion", "cat_train.adapters.catversion",
                        "cat_train.catversion")
CatVersionSpec = pick("CatVersionSpec", "cat_train.adapters.catversion", "cat_train.catversion")
CatVersionConfig = pick("CatVersionConfig", "cat_train.training.catversion", "cat_train.adapters.catversion",
                        "cat_train.catversion")
bench = importlib.import_module("cat_train.world.bench")
masked_bench = importlib.import_module("cat_train.world.masked_bench")
wm = importlib.import_module("cat_train.world.model")
wg = importlib.import_module("cat_train.world.generator")


def header_of_terms(loss_cfg, cfg, history) -> dict:
    """The step terms' settings for a LoRA header (APT, auto, min-SNR, mask, EMA), however a commit composes them."""
    for regularizers, weight_terms in (("cat_train.terms.registry", "cat_train.terms.weight_terms"),
                                       ("cat_train.regularizers", "cat_train.weight_terms")):
        try:
            r, w = importlib.import_module(regularizers), importlib.import_module(weight_terms)
            return {**r.metadata(loss_cfg, history), **w.metadata(cfg)}
        except ImportError:
            continue
    return pick("metadata", "cat_train.terms.registry")(loss_cfg, cfg, history)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def history_hash(history) -> str:
    return sha(json.dumps(history, sort_keys=True, default=repr).encode())


def weights_hash(weights) -> str:
    h = hashlib.sha256()

    def walk(prefix, v):
        if isinstance(v, torch.Tensor):
            h.update(prefix.encode() + str(v.dtype).encode() + v.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                walk(f"{prefix}/{k}", v[k])
        elif isinstance(v, torch.nn.Module):
            walk(prefix, v.state_dict())
        else:
            h.update(f"{prefix}={v!r}".encode())
    walk("", weights)
    return h.hexdigest()[:16]


def run_id(folder: Path) -> str:
    return json.loads((folder / "cat-run.json").read_text())["run_id"]


def show(name: str, result, folder: Path | None = None, header: dict | None = None) -> None:
    hist = result.history
    print(f"{name:14s} steps {len(hist):3d}  loss {hist[-1]['loss']!r}  history {history_hash(hist)}  "
          f"weights {weights_hash(result.weights if hasattr(result, 'weights') else result.embeddings)}"
          + (f"  run {run_id(folder)}" if folder else "")
          + (f"  header {sha(json.dumps(header, sort_keys=True).encode())}" if header is not None else ""))


def lora_run(name, world, examples, loss_cfg, tmp, steps=30, spec=None, **cfg_kw) -> None:
    folder = Path(tmp) / name
    cfg = TrainConfig(steps=steps, lr=1e-3, seed=0, checkpoint_dir=str(folder), save_every=steps, **cfg_kw)
    spec = spec or LoraSpec(rank=4, alpha=4, preset="full")
    r = train(world.den, examples, loss_cfg, spec, cfg)
    show(name, r, folder, header_of_terms(loss_cfg, cfg, r.history))


def main() -> int:
    torch.set_num_threads(1)
    c = bench.BenchConfig(steps=400, lr=1e-3, seeds=(0,), per_prompt=2, sample_steps=15, methods=("lora", "cat1"))
    res = bench.run(c, log=lambda *a: None)
    for m in c.methods:
        show(f"demo {m}", res["trained"][m])
    print(bench.table(res))

    world = bench.World()
    items = bench.identity_items()
    with tempfile.TemporaryDirectory() as tmp:
        ex, lc, _ = bench.examples_for("cat1+apt", world, c, 0)
        lora_run("apt", world, ex, replace(lc, apt=replace(lc.apt, align_skip_triggers=True)), tmp)
        ex, lc, _ = bench.examples_for("cat1:auto", world, replace(c, auto_every=10, auto_threshold=0.0), 0)
        lora_run("auto", world, ex, lc, tmp)
        imgs, masks = masked_bench.task()
        mitems = [(wm.encode(torch.from_numpy(wg.to_tensor_array(im[None])))[0], masked_bench.CAPTION, (wg.TRIGGER,), 1,
                   latent_mask(torch.from_numpy(m), wm.LATENT_SHAPE[1:])) for im, m in zip(imgs, masks)]
        lc = CatLossConfig(alpha=1.0, class_word=wg.IDENTITY_CLASS, mask_floor=0.1, mask_keep=1.0)
        lora_run("mask", world, build_examples(mitems, world.encode_text, lc), lc, tmp)
        lc = CatLossConfig(alpha=1.0, class_word=wg.IDENTITY_CLASS, min_snr_gamma=5.0)
        lora_run("min_snr", world, build_examples(items, world.encode_text, lc), lc, tmp, timestep_min=100,
                 timestep_max=900)
        lc = CatLossConfig(alpha=1.0, class_word=wg.IDENTITY_CLASS)
        tc = TrainConfig(caption_dropout=0.2, shuffle_tags=True, caption_variants=3, seed=0)
        lora_run("captions", world, build_examples(items, world.encode_text, lc, cfg=tc), lc, tmp, caption_dropout=0.2,
                 shuffle_tags=True, caption_variants=3, batch_size=2, grad_accum=2)
        lc = CatLossConfig(alpha=1.0, class_word=wg.IDENTITY_CLASS, keep_every=2, keep_fraction=0.5)
        lora_run("cheap", world, build_examples(items, world.encode_text, lc), lc, tmp, batch_size=2)
        lc = CatLossConfig(alpha=1.0, class_word=wg.IDENTITY_CLASS)
        ex = build_examples(items, world.encode_text, lc)
        lora_run("ema", world, ex, lc, tmp, ema_decay=0.9, ema_start_step=5)
        lora_run("loha", world, ex, lc, tmp, spec=LoraSpec(rank=4, alpha=4, preset="full", algorithm="loha"))

        spec = CatVersionSpec(layers=2)
        cfg = CatVersionConfig(steps=30, lr=1e-2, batch_size=2, alpha=1.0, class_word=wg.IDENTITY_CLASS, seed=0,
                               flip=0.5)
        folder = Path(tmp) / "catversion"
        r = train_catversion(world.den, {"text": world.text}, world.text.encode, items, spec, cfg,
                             checkpoint_dir=str(folder), save_every=30)
        show("catversion", r, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
