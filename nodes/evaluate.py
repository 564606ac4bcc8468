"""KPS Evaluator work: open_clip embeddings of IMAGE batches and prompts, then PS / IS / KPS and a chart."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .metrics import scores

_MODELS: dict = {}


def load_open_clip(checkpoint: str, arch: str):
    import folder_paths
    import open_clip

    path = folder_paths.get_full_path("clip", checkpoint)
    if path is None:
        raise ValueError(f"open_clip checkpoint {checkpoint!r} is not in models/clip; put e.g. an open_clip "
                         "ViT-B-32 .safetensors/.bin there and pick it, with its architecture name in open_clip_model.")
    key = (path, arch)
    if key not in _MODELS:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
        except Exception as e:
            raise ValueError(f"could not load {path} as open_clip {arch!r}: {e}. Is open_clip_model the checkpoint's architecture?") from e
        _MODELS[key] = (model.eval(), open_clip.get_tokenizer(arch), model.visual.image_size)
    return _MODELS[key]


@torch.inference_mode()
def embed_images(model, size, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B,H,W,3) in [0,1] -> normalised CLIP embeddings, with CLIP's resize and normalisation."""
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = images.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return torch.nn.functional.normalize(model.encode_image((x - mean) / std).float(), dim=-1)


@torch.inference_mode()
def embed_texts(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    return torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)


def chart(values: dict[str, float], size=(480, 240)) -> torch.Tensor:
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    colors = {"PS": (60, 110, 220), "IS": (40, 160, 90), "KPS": (220, 60, 60)}
    bw = (w - 40) // max(1, len(values))
    for i, (k, v) in enumerate(values.items()):
        x = 20 + i * bw
        top = h - 30 - int((h - 60) * max(0.0, min(1.0, v)))
        d.rectangle([x + 10, top, x + bw - 10, h - 30], fill=colors.get(k, (120, 120, 120)))
        d.text((x + 10, h - 25), f"{k} {v:.4f}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def evaluate(with_t, without_t, refs, prompts: str, checkpoint: str, arch: str, loaded=None):
    if with_t.shape[0] != without_t.shape[0]:
        raise ValueError(f"{with_t.shape[0]} images with the trigger but {without_t.shape[0]} without; "
                         "KPS pairs them one to one (same seeds), so give equal batches.")
    model, tok, size = loaded or load_open_clip(checkpoint, arch)
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    if lines and len(lines) not in (1, with_t.shape[0]):
        raise ValueError(f"{len(lines)} prompts for {with_t.shape[0]} images: give one per image, or one for all.")
    txt = embed_texts(model, tok, lines * with_t.shape[0] if len(lines) == 1 else lines) if lines else None
    s = scores(embed_images(model, size, with_t), embed_images(model, size, without_t),
               embed_images(model, size, refs) if refs is not None else None, txt)
    ps, is_ = s.get("PS", float("nan")), s.get("IS", float("nan"))
    report = (f"KPS {s['KPS']:.4f} (1 - H of with/without-trigger image similarity; higher = less leakage)\n"
              f"PS  {ps:.4f} (prompt fidelity)" + ("" if lines else " - no prompts given") + "\n"
              f"IS  {is_:.4f} (identity)" + ("" if refs is not None else " - no reference images") + "\n"
              f"{s['pairs']} pairs; similarities clamped at 1e-6: KPS {s['KPS_clamped']}, PS {s.get('PS_clamped', 0)}, IS {s.get('IS_clamped', 0)}\n"
              "paper (Table 1): LoRA KPS 0.0808, CAT 0.1231")
    vals = {k: v for k, v in (("PS", ps), ("IS", is_), ("KPS", s["KPS"])) if v == v}
    return ps, is_, s["KPS"], report, chart(vals)
