"""CatVersion files: safetensors with each encoder's Keys/Values per layer and the shapes in the header."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..export import load_lora, save_lora
from .embeddings import KVEmbeddings
from .spec import check_compatible

FORMAT = "cat_train.catversion/1"  # the files' format id (not a module path): every file written so far says this


def save_catversion(path: str | Path, embeddings: Mapping[str, KVEmbeddings],
                    metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors: `<encoder>.<layer>.key` / `.value` (length, hidden) fp32, header metadata with the shapes."""
    tensors, info = {}, {}
    for enc, emb in embeddings.items():
        for j, i in enumerate(emb.layer_indices):
            tensors[f"{enc}.{i}.key"] = emb.keys[j].detach().float().cpu().contiguous().clone()
            tensors[f"{enc}.{i}.value"] = emb.values[j].detach().float().cpu().contiguous().clone()
        info[enc] = emb.info()
    meta = {"catversion_format": FORMAT, "catversion_encoders": json.dumps(info),
            "catversion_paper": "CatVersion, Zhao et al., arXiv 2311.14631", **dict(metadata or {})}
    return save_lora(path, tensors, {k: str(v) for k, v in meta.items()})


def load_catversion(path: str | Path,
                    expect: Mapping[str, Mapping] | None = None) -> tuple[dict[str, KVEmbeddings], dict[str, str]]:
    """Embeddings per encoder name and the header metadata; a file that is not CatVersion's is refused by name.

    expect: {encoder name: encoder_info(...)} of the text encoders it will be applied to; a file made for
    another encoder (hidden size, layer count, heads, missing encoder) is refused naming the file."""
    path = Path(path)
    tensors, meta = load_lora(path)
    if meta.get("catversion_format") != FORMAT:
        raise ValueError(f"{path} is not a CatVersion file (no catversion_format={FORMAT} in its metadata); "
                         "LoRAs go through LoraLoader, CatVersion embeddings through Apply CatVersion.")
    out = {}
    for enc, info in json.loads(meta["catversion_encoders"]).items():
        emb = KVEmbeddings(info["indices"], int(info["length"]), int(info["hidden"]), int(info["heads"]),
                           int(info["layers"]),
                           float(info.get("prefix_bias", 0.0)))  # files from before the option: an ordinary key
        with torch.no_grad():
            for j, i in enumerate(emb.layer_indices):
                for kind, p in (("key", emb.keys), ("value", emb.values)):
                    t = tensors.get(f"{enc}.{i}.{kind}")
                    if t is None or tuple(t.shape) != tuple(p.shape[1:]):
                        raise ValueError(f"{path}: tensor {enc}.{i}.{kind} is "
                                         f"{'missing' if t is None else tuple(t.shape)}, expected "
                                         f"{tuple(p.shape[1:])}; the file is damaged or was edited, train it again.")
                    p[j].copy_(t.float())
        out[enc] = emb.requires_grad_(False)
    if expect is not None:
        missing = sorted(set(out) - set(expect))
        if missing or not out:
            raise ValueError(f"{path} holds embeddings for text encoder(s) {sorted(out)}, but this CLIP has "
                             f"{sorted(expect)}: it was trained on another model family; use it with that CLIP or "
                             "train again on this one.")
        for enc, emb in out.items():
            check_compatible(emb.info(), expect[enc], str(path), enc)
    return out, meta
