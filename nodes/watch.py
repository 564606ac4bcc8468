"""The trainer node watching its run: preview rounds, validation and, per saved step, IS/KPS and the best step.

The pieces are the core's (cat_train.measure.preview, .validation, .metrics, .best_step; docs/measuring.md); this module
gives them what only ComfyUI has: the dataset's CLIP for prompts, the graph's VAE to decode previews, a
CLIP_VISION for image embeddings, ComfyUI's folders, the node's progress preview and the live view's events.
Nothing here draws from the training RNG or changes a mode or the adapter switch for good (the pieces run under
observe.observing and adapter_switched), so the same seed gives the same LoRA with all of it on or off.

Per run, under output/cat_checkpoints/<checkpoint_name>/: previews.png (the grid so far), validation.csv, steps.csv
(step, IS, KPS, keep drift, fit, LoRA file) and steps.png (the per-step chart); each step LoRA file gets its preview
grid beside it as <name>_stepNNNNNN.png.
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import torch

from ..cat_train.measure.best_step import pick_best_step
from ..cat_train.measure.metrics import score_images
from ..cat_train.measure.preview import Previewer, preview_prompts
from ..cat_train.data.prompts import preservation_prompt, triggers_in
from ..cat_train.measure.validation import ValidationLog, Validator
from .common import send_event

log = logging.getLogger("ComfyUI-CAT")
VALIDATION_EVENT = "cat.train.validation"  # web/cat_live_view.js draws these next to the loss


def split_prompts(text: str | None) -> list[str]:
    """Prompts typed into one widget: separated by '|' or new lines, blanks dropped."""
    return [p.strip() for line in (text or "").splitlines() for p in line.split("|") if p.strip()]


def with_their_plain_twins(prompts: list[str], triggers) -> list[str]:
    """Each prompt with a trigger followed, if missing, by itself without the trigger: KPS pairs the two (same
    noise)."""
    out = list(prompts)
    for p in prompts:
        if triggers_in(p, triggers):
            plain = preservation_prompt(p, triggers, "strip")
            if plain not in out:
                out.append(plain)
    return out


def vae_decoder(vae, mp):
    """latents in the model's space -> IMAGE (B, H, W, 3). Loading the VAE may evict the training UNet from the GPU
    (ComfyUI frees memory by unloading models): it is loaded back as trainable() loads it, the same Parameter
    objects moved back, before the next training step. Not exercised on a GPU by the tests (CPU only)."""
    import comfy.model_management as mm

    from .comfy_model import family_of

    video = getattr(family_of(mp), "video", False)  # Wan: a one-frame clip (B, C, 1, H, W) decodes to (B, 1, H, W, 3)

    def decode(z: torch.Tensor) -> torch.Tensor:
        z = z.float().cpu()
        images = vae.decode(mp.model.process_latent_out(z[:, :, None] if video else z)).float()
        images = images.reshape(-1, *images.shape[-3:])  # a video VAE gives (B, frames, H, W, 3)
        mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
        return images
    return decode


class NodeWatch:
    """Hooks for cat_train.training.loop: `callback(info)` (validation and preview rounds) and `on_save(step, weights)`
    (a preview round and IS/KPS for the step file). `image()` is the grid for the node's progress preview."""

    def __init__(self, den, mp, dataset, examples, out_dir: Path, node_id, prompt_id, seed: int, vae=None,
                 preview_every: int = 0, prompts: str = "", validate_every: int = 0, probes: str = "", clip_vision=None,
                 step_file=None, preservation_prompts=(), encode=None):
        self.den, self.node_id, self.prompt_id, self.out_dir = den, node_id, prompt_id, Path(out_dir)
        self.preview_every, self.validate_every, self.clip_vision = preview_every, validate_every, clip_vision
        self.step_file = step_file or (lambda step: None)
        self.rows: dict[int, dict] = {}  # per saved step
        self.validation: list[dict] = []
        self._validated, self._previewed = {}, set()
        self._image_dirty = False
        self.refs, self.triggers = dataset.pixels, tuple(dataset.triggers)
        if (preview_every or clip_vision is not None) and vae is None:
            raise ValueError("CAT LoRA Trainer: preview_every > 0 (or a clip_vision to score saved steps) needs the "
                             "vae input: connect the checkpoint's VAE (the same one CAT Dataset uses).")
        self.previewer = None
        if preview_every or clip_vision is not None:
            first = dataset.items[0][1]
            chosen = split_prompts(prompts) or preview_prompts(first, dataset.triggers, preservation_prompts)
            chosen = with_their_plain_twins(chosen, dataset.triggers)
            self.previewer = Previewer(den, encode, chosen, dataset.triggers, tuple(examples[0].latent.shape),
                                       vae_decoder(vae, mp), seed=seed, steps=20, cfg=5.0)
        self.validator = None
        if validate_every:
            probe = {p: {k: v[0] for k, v in encode([p]).items()} for p in split_prompts(probes)}
            # one image per pass, 2 points: a pass is (2 + probes) x 2 samples, small enough beside training at 1024 px
            self.validator = Validator(den, examples, probes=probe, points=2, seed=seed, batch_size=1)
        # Nothing is written before the run's folder is settled (train() gives a second run with one checkpoint_name
        # a folder of its own before step 1, and move_to follows it): step 0's validation row waits until step 1.
        self.vlog, self._held = None, []

    # --- hooks -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.previewer is not None:
            self.previewer.base()
        if self.validator is not None:
            self._validate(0, None)

    def move_to(self, folder) -> None:
        """The run was given its own folder (a second run with this checkpoint_name): its files go there."""
        self.out_dir = Path(folder)

    def _settle(self) -> None:
        if self.vlog is None and self.validator is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.vlog = ValidationLog(self.out_dir / "validation.csv")
            for row in self._held:
                self.vlog.write(row)

    def callback(self, info) -> None:
        self._settle()
        last = info.step == info.total
        if self.validator is not None and (info.step % self.validate_every == 0 or last):
            self._validate(info.step, info.total)
        if self.preview_every and (info.step % self.preview_every == 0 or last):
            self._preview(info.step)

    def on_save(self, step: int, _weights) -> None:
        self._settle()
        if self.previewer is None and self.validator is None:
            return
        row = {"step": step}
        if self.previewer is not None:
            drawn = self._preview(step)
            if self.clip_vision is not None:
                row.update(self._scores(drawn))
        if self.validator is not None:
            v = self._validate(step, None)
            row.update({"keep_drift": v["keep_drift"], "fit": v["fit"]})
        f = self.step_file(step)
        row["file"] = str(f) if f else ""
        if f and self.previewer is not None:
            self.previewer.save(Path(f).with_suffix(".png"))
        self.rows[step] = row

    def close(self) -> None:
        if self.validator is not None:
            self._settle()
            self.vlog.close()

    # --- pieces ------------------------------------------------------------------------------------------------
    def _validate(self, step: int, total) -> dict:
        if step in self._validated:
            return self._validated[step]
        row = self.validator(step)
        self._validated[step] = row
        self.validation.append(row)
        if self.vlog is None:
            self._held.append(row)
        else:
            self.vlog.write(row)
        send_event(VALIDATION_EVENT, {"node": self.node_id, "prompt_id": self.prompt_id, "total": total, **row})
        return row

    def _preview(self, step: int) -> list:
        if step in self._previewed:
            return self.previewer.rows[-1][1]
        self._previewed.add(step)
        row = self.previewer(step)
        self.previewer.save(self.out_dir / "previews.png")
        self._image_dirty = True
        return row

    def _scores(self, drawn: list) -> dict:
        """IS (the dataset's images vs the trigger columns) and KPS (trigger columns vs their plain twins, same
        noise)."""
        from .evaluate import vision_embedder

        ps = self.previewer.prompts
        trig = [i for i, t in enumerate(self.previewer.has_trigger) if t]
        twin = {i: ps.index(preservation_prompt(ps[i], self.triggers, "strip")) for i in trig}
        s = score_images(vision_embedder(self.clip_vision), [drawn[i] for i in trig], [drawn[twin[i]] for i in trig],
                         list(self.refs))
        return {"IS": s["is"], "KPS": s["kps"]}

    def image(self):
        """The grid so far as a PIL image, once per new round (None otherwise): the node's progress preview."""
        if self.previewer is None or not self._image_dirty:
            return None
        from PIL import Image

        self._image_dirty = False
        return Image.fromarray(self.previewer.grid())

    # --- results -----------------------------------------------------------------------------------------------
    def grid_tensor(self) -> torch.Tensor | None:
        if self.previewer is None or not self.previewer.rows:
            return None
        return torch.from_numpy(self.previewer.grid().astype("float32") / 255.0)[None]

    def table(self) -> list[dict]:
        return [self.rows[s] for s in sorted(self.rows)]

    def best(self, is_tolerance: float = 0.02, max_keep_drift: float | None = None):
        """(BestStep, None) or (None, why not)."""
        rows = self.table()
        if not rows:
            return None, "no saved steps (set save_every)"
        if not any(isinstance(r.get("IS"), float) and math.isfinite(r["IS"]) for r in rows):
            return None, "no IS per saved step (connect a CLIP vision model to clip_vision, and the vae)"
        return pick_best_step(rows, is_tolerance, max_keep_drift), ""

    def write_table(self) -> Path | None:
        rows = self.table()
        if not rows:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "steps.csv"
        cols = ["step", "IS", "KPS", "keep_drift", "fit", "file"]
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:
                w.writerow([r.get(c, "") for c in cols])
        return path

    def summary(self) -> str:
        lines = []
        if self.previewer is not None and self.previewer.seconds:
            sec = self.previewer.seconds
            lines.append(f"previews: {len(sec)} rounds, {sum(sec) / len(sec):.2f} s per round "
                         f"({len(self.previewer.prompts)} prompts), grid {self.out_dir / 'previews.png'}")
        if self.validation:
            v = self.validation[-1]
            lines.append(f"validation ({len(self.validation)} rows, {self.out_dir / 'validation.csv'}): step "
                         f"{v['step']} fit {v['fit']:.5f} keep drift {v['keep_drift']:.6f}"
                         + (f" probe drift {v['probe_drift']:.6f}" if "probe_drift" in v else ""))
        rows = self.table()
        if rows:
            lines.append("step | IS | KPS | keep drift | fit")
            fmt = lambda x, d: f"{x:.{d}f}" if isinstance(x, float) and math.isfinite(x) else "-"
            lines += [f"{r['step']} | {fmt(r.get('IS'), 3)} | {fmt(r.get('KPS'), 3)} | {fmt(r.get('keep_drift'), 5)} | "
                      f"{fmt(r.get('fit'), 5)}" for r in rows]
        return "\n".join(lines)


def step_chart(rows: list[dict]):
    """IS, KPS, keep drift and fit per saved step as a ComfyUI IMAGE, or None without rows."""
    from ..cat_train.measure.plot import loss_curve
    from .common import image_of

    keys = tuple(k for k in ("IS", "KPS", "keep_drift", "fit")
                 if any(isinstance(r.get(k), float) and math.isfinite(r[k]) for r in rows))
    if len(rows) < 1 or not keys:
        return None
    return image_of(loss_curve([{**{k: r.get(k, float("nan")) for k in keys}, "step": r["step"]} for r in rows],
                               keys=keys, title="per saved step", smooth=False))
