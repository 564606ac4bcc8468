"""The CAT Dataset node: a kohya-style folder (read by cat_train.dataset) encoded once with the graph's VAE and CLIP."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from comfy_api.latest import io

from ..cat_train.dataset import load_dataset
from ..cat_train.loss import repeat_to_common_length
from .common import CATEGORY, Dataset, input_path


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
    _text_cache: dict = field(default_factory=dict, repr=False)

    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batched {"context": (B,L,C), "pooled": (B,P)}; each prompt goes through CLIP once per dataset."""
        for p in prompts:
            if p not in self._text_cache:
                cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(p))
                ctx, extra = cond[0][0], cond[0][1]
                pooled = extra.get("pooled_output")
                self._text_cache[p] = (ctx[0].detach().float().cpu().clone(),
                                       None if pooled is None else pooled[0].detach().float().cpu().clone())
        rows = [self._text_cache[p] for p in prompts]
        # long captions make more 77-token chunks: repeat shorter ones whole, as ComfyUI batches conditionings
        out = {"context": torch.stack(repeat_to_common_length([r[0] for r in rows], 0))}
        if rows[0][1] is not None:
            out["pooled"] = torch.stack([r[1] for r in rows])
        return out

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
                  res: int, buckets: bool, where: str = "prepend") -> CatDataset:
    """Images decoded, bucketed and captioned by the core (errors name the file and the fix); each latent
    is encoded once here, in ComfyUI's IMAGE layout (1, H, W, 3) in [0, 1]."""
    ds = load_dataset(folder, triggers, class_word, caption_ext, where, res, buckets)
    items = []
    for it in ds.items:
        latent = vae.encode(((it.pixels.permute(1, 2, 0) + 1) / 2).clamp(0, 1)[None])
        items.append((latent[0].detach().float().cpu().clone(), it.caption, it.triggers, it.repeats))
    return CatDataset(items, tuple(triggers), class_word, clip, str(folder), skipped=[str(p) for p, _ in ds.skipped],
                      warnings=list(ds.warnings))


class CatDatasetNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_Dataset", display_name="CAT Dataset", category=CATEGORY,
            description="Images + same-name captions from a folder, encoded once with the graph's VAE and CLIP.",
            inputs=[
                io.Vae.Input("vae"), io.Clip.Input("clip"),
                io.String.Input("folder", default="cat_dataset", tooltip="subfolder of ComfyUI's input folder, or a full path"),
                io.String.Input("triggers", default="sks", tooltip="trigger token(s), comma separated"),
                io.String.Input("class_word", default="", tooltip="e.g. 'dog'; used for captionless images"),
                io.String.Input("caption_extension", default=".txt"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64),
                io.Boolean.Input("buckets", default=True, tooltip="keep aspect ratios (sides multiples of 64)"),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.Int.Output(display_name="images"),
                     io.String.Output(display_name="info")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, **kw):
        root = input_path(folder)  # re-encode when files change, not on every queue
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())) if root.is_dir() else folder

    @classmethod
    def execute(cls, vae, clip, folder, triggers, class_word, caption_extension, resolution, buckets) -> io.NodeOutput:
        trig = tuple(t.strip() for t in triggers.split(",") if t.strip())
        ds = build_dataset(input_path(folder), vae, clip, trig, class_word.strip(), caption_extension, resolution, buckets)
        return io.NodeOutput(ds, len(ds.items), info(ds))


def info(ds: CatDataset) -> str:
    """The node's info output: buckets, skipped files, warnings."""
    text = f"{len(ds.items)} images in {len(ds.buckets)} bucket(s): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(ds.buckets.items()))
    if ds.skipped:
        text += f"\nskipped {len(ds.skipped)} unreadable file(s): " + ", ".join(ds.skipped)
    if ds.warnings:
        text += "\n" + "\n".join(ds.warnings)
    return text


NODES = [CatDatasetNode]
