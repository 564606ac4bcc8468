"""The CAT Dataset node: a kohya-style folder (read by cat_train.data.dataset) encoded once with the graph's VAE and
CLIP."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from comfy_api.latest import io

from ..cat_train.data.dataset import DatasetError, caption_suffix, check_resolution, folders, plan_dataset
from ..cat_train.data.masks import latent_mask
from ..cat_train.step.conds import repeat_to_common_length
from . import early_cancel
from .comfy_model import COND_EXTRAS
from .common import CATEGORY, Dataset, input_path, phase_progress, range_problem
from .compat import search_aliases

log = logging.getLogger("ComfyUI-CAT")
REFERENCE_IMAGES = 64  # kept for the IMAGE output; IS pairs them with a few generated images


@dataclass
class CatDataset:
    """What CAT Dataset passes to the trainer: cached latents plus a memoised caption encoder."""
    items: list[tuple[torch.Tensor, str, tuple[str, ...], int]]  # (latent (C,H,W), caption y_T, triggers, repeats)
    triggers: tuple[str, ...]
    class_word: str
    clip: object
    source: str
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # legacy caption encodings, tiny images: shown in the node's info
    budget: str = ""  # the memory line printed before decoding
    # reference images, uint8 (H, W, 3): see build_dataset
    pixels: list[torch.Tensor] = field(default_factory=list, repr=False)
    # per item: (1, h, w) at its latent's size, or None
    masks: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    mask_problems: list[str] = field(default_factory=list)  # mask files not used: the trainer refuses them when masked
    _text_cache: dict = field(default_factory=dict, repr=False)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batched {"context": (B,L,C), "pooled": (B,P)} plus the CONDITIONING entries the network reads as they are
        (`COND_EXTRAS`, by their network kwarg); each prompt goes through CLIP once per dataset."""
        for p in prompts:
            if p not in self._text_cache:
                cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(p))
                ctx, extra = cond[0][0], cond[0][1]
                pooled = extra.get("pooled_output")
                self._text_cache[p] = (ctx[0].detach().float().cpu().clone(),
                                       None if pooled is None else pooled[0].detach().float().cpu().clone(),
                                       {kw: extra[k][0].detach().float().cpu().clone() for k, kw in COND_EXTRAS.items()
                                        if k in extra})
        rows = [self._text_cache[p] for p in prompts]
        # long captions make more 77-token chunks: repeat shorter ones whole, as ComfyUI batches conditionings
        out = {"context": torch.stack(repeat_to_common_length([r[0] for r in rows], 0))}
        if rows[0][1] is not None:
            out["pooled"] = torch.stack([r[1] for r in rows])
        out.update({k: torch.stack([r[2][k] for r in rows]) for k in rows[0][2]})  # e.g. HiDream's Llama states
        return out

    def rank_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, C): CLIP-L's conditioning alone, not cached, one batch of 77-token chunks. `nearest` auto
        preservation ranks its ~5,800-word vocabulary with it (cat_train/terms/nearest.py): through encode_text's
        cache SDXL's contexts alone would hold ~4 GB. CLIP-L is in every family the trainer takes (SD1.x, SDXL, SD3,
        Flux), where SD3's and Flux's T5 would take minutes over the list; in Flux the UNet reads CLIP-L only pooled
        (docs/auto-preservation.md)."""
        clip = self.clip
        cs = clip.cond_stage_model
        toks = [clip.tokenize(p) for p in prompts]
        enc = getattr(cs, "clip_l", None)
        if enc is None or any("l" not in t for t in toks):
            # no CLIP-L: the family's own conditioning, a prompt at a time
            return torch.stack(repeat_to_common_length([clip.encode_from_tokens(t)[0].float().cpu() for t in toks], 0))
        cs.reset_clip_options()
        if clip.layer_idx is not None:  # CLIP Set Last Layer, as ComfyUI's own encode honours it
            cs.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()
        # ComfyUI >= 0.3.6x encodes there; older ignore it
        cs.set_clip_options({"execution_device": clip.patcher.load_device})
        with torch.no_grad():
            out = enc.encode_token_weights([c for t in toks for c in t["l"]])[0][0].float().cpu()  # (77 x chunks, C)
        cs.reset_clip_options()
        rows, at = [], 0
        for t in toks:
            n = out.shape[0] * len(t["l"]) // sum(len(u["l"]) for u in toks)
            rows.append(out[at:at + n])
            at += n
        return torch.stack(repeat_to_common_length(rows, 0))

    def token_positions(self, caption: str, triggers: tuple[str, ...]) -> tuple[int, ...]:
        """Where the triggers' tokens sit in the caption's context (77-token chunks back to back), by CLIP's own
        tokenizer (its first, for SDXL's two: they share positions); for APT's align_skip_triggers."""
        def ids(text):
            toks = self.clip.tokenize(text)
            return [[t[0] for t in chunk] for chunk in toks[next(iter(toks))]]
        end = ids("")[0][1]  # the empty prompt is start, end, padding
        flat = [t for chunk in ids(caption) for t in chunk]
        found = set()
        for trig in triggers:
            first = ids(trig)[0]
            inner = first[1:first.index(end, 1)] if end in first[1:] else first[1:]
            for i in range(len(flat) - len(inner) + 1):
                if inner and flat[i:i + len(inner)] == inner:
                    found.update(range(i, i + len(inner)))
        return tuple(sorted(found))

    @property
    def buckets(self) -> dict[tuple[int, int], int]:
        b: dict[tuple[int, int], int] = {}
        for lat, *_ in self.items:
            key = (lat.shape[-1] * 8, lat.shape[-2] * 8)
            b[key] = b.get(key, 0) + 1
        return b


def build_dataset(folder: Path, vae, clip, triggers: tuple[str, ...], class_word: str, caption_ext: str,
                  res: int, buckets: bool, where: str = "prepend", tick=None, masks: str = "auto") -> CatDataset:
    """Images decoded, bucketed and captioned by the core (errors name the file and the fix), one at a time: each is
    encoded here, in ComfyUI's IMAGE layout (1, H, W, 3) in [0, 1], before the next is decoded, so memory holds the
    latents and one image (2000 images at 512 px: 6.8 GB of float32 pixels at once before). tick() per image moves
    the progress bar and honours Cancel. The first REFERENCE_IMAGES images are kept as uint8 for the node's IMAGE
    output (the KPS Evaluator's reference images pair with a few generated ones): bounded, 0.75 MB each at 512 px.
    masks (cat_train.data.masks.MASK_SOURCES; auto: a <name>-masklabel file, else an alpha channel that is not all
    opaque): each image's mask, averaged down to its latent's size. Read whenever present, used only when the
    trainer's mask_floor < 1 or mask_keep > 0 (a widget here would shift every shipped workflow's widget values)."""
    plan = plan_dataset(folder, triggers, class_word, caption_ext, where, res, buckets, masks=masks)
    log.info("ComfyUI-CAT %s", plan.budget())
    tick = tick or phase_progress(len(plan.records))
    items, pixels, latent_masks = [], [], []
    for it in plan.decode():
        image = ((it.pixels.permute(1, 2, 0) + 1) / 2).clamp(0, 1)
        latent = vae.encode(image[None])
        items.append((latent[0].detach().float().cpu().clone(), it.caption, it.triggers, it.repeats))
        latent_masks.append(None if it.mask is None else latent_mask(it.mask, tuple(latent.shape[-2:])))
        if len(pixels) < REFERENCE_IMAGES:
            pixels.append((image.detach().float().cpu() * 255).round().to(torch.uint8))
        tick()
    warnings = plan.finish(len(items))
    skipped = [why if str(p) in why else f"{p}: {why}" for p, why in plan.skipped]
    return CatDataset(items, tuple(dict.fromkeys(triggers)), class_word, clip, str(folder),
                      skipped=skipped, warnings=warnings, budget=plan.budget(), pixels=pixels,
                      masks=latent_masks, mask_problems=list(plan.mask_problems))


def image_batch(pixels: list[torch.Tensor]) -> torch.Tensor:
    """The dataset's images as one IMAGE batch (B, H, W, 3) in [0, 1]: an IMAGE batch has one size, so images of other
    buckets are resized (bilinear) to the first image's size. Reference images for IS: CLIP resizes them anyway."""
    if not pixels:
        raise ValueError("the dataset has no images; put images (with same-name captions) in the CAT Dataset folder.")
    pixels = [p.float() / 255 for p in pixels]
    h, w = pixels[0].shape[:2]
    out = [p if p.shape[:2] == (h, w) else
           torch.nn.functional.interpolate(p.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                           align_corners=False)[0].permute(1, 2, 0)
           for p in pixels]
    return torch.stack(out).clamp(0, 1)


class CatDatasetNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_Dataset", display_name="CAT Dataset", category=CATEGORY,
            **search_aliases("lora dataset", "training images", "kohya dataset", "image folder"),
            description="Images + same-name captions from a folder, encoded once with the graph's VAE and CLIP; masks "
                        "(<name>-masklabel.png or alpha) for masked training (CAT Training Options).",
            inputs=[
                io.Vae.Input("vae"), io.Clip.Input("clip"),
                io.String.Input("folder", default="cat_dataset", tooltip=
                        "subfolder of ComfyUI's input folder, or a full path"),
                io.String.Input("triggers", default="sks", tooltip="trigger token(s), comma separated"),
                io.String.Input("class_word", default="", tooltip="e.g. 'dog'; used for captionless images"),
                io.String.Input("caption_extension", default=".txt"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64),
                io.Boolean.Input("buckets", default=True, tooltip="keep aspect ratios (sides multiples of 64)"),
            ],
            # outputs are linked by slot index: new ones go at the end. The INT is the image count; "images" is the
            # IMAGE batch (reference images for the KPS Evaluator's IS), which ComfyUI core cannot load from a folder
            outputs=[Dataset.Output(display_name="dataset"), io.Int.Output(display_name="count"),
                     io.String.Output(display_name="info"), io.Image.Output(display_name="images")],
        )

    @classmethod
    def validate_inputs(cls, caption_extension=None, resolution=None):
        """ComfyUI checks min/max but not step: resolution 100 over the API trained at 64x128. Naming `resolution`
        here turns ComfyUI's own range check off for it, so range_problem does it."""
        ranged = range_problem(cls, resolution=resolution)
        if ranged is not True:
            return ranged
        try:
            if caption_extension is not None:
                caption_suffix(caption_extension)
            if resolution is not None:
                check_resolution(resolution)
        except DatasetError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, **kw):
        """Re-encode when the files it reads change, not on every queue: the root and its N_name folders only (what
        the node reads), capped, so a folder like /usr is not walked in full on every queue."""
        try:
            groups, _ = folders(input_path(folder))
        except (DatasetError, OSError):
            return folder  # execute reports it
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for g, *_ in groups for p in g.iterdir() if p.is_file()))

    @classmethod
    def execute(cls, vae, clip, folder, triggers, class_word, caption_extension, resolution, buckets) -> io.NodeOutput:
        early_cancel.check()  # a Cancel sent before this prompt started (ComfyUI drops it)
        trig = tuple(t.strip() for t in triggers.split(",") if t.strip())
        ds = build_dataset(input_path(folder), vae, clip, trig, class_word.strip(), caption_extension, resolution,
                           buckets)
        return io.NodeOutput(ds, len(ds.items), info(ds), image_batch(ds.pixels))


def info(ds: CatDataset) -> str:
    """The node's info output: buckets, skipped files, warnings."""
    text = (f"{len(ds.items)} images in {len(ds.buckets)} bucket(s): "
            + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(ds.buckets.items())))
    masked = sum(m is not None for m in ds.masks)
    text += f"; {masked} with masks" if masked else ""
    if ds.skipped:
        # each with why: a huge PNG said "unreadable" while the core had said "too large, downscale it"
        text += f"\nskipped {len(ds.skipped)} file(s):" + "".join(f"\n- {why}" for why in ds.skipped)
    if ds.warnings:
        text += "\n" + "\n".join(ds.warnings)
    if ds.budget:
        text += "\n" + ds.budget
    return text


NODES = [CatDatasetNode]
