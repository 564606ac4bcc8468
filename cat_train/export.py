"""LoRA files in kohya's format: what ComfyUI's LoraLoader, A1111/Forge and kohya's scripts load.

Kohya keys name diffusers module paths (`lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight`);
our layers carry ldm names (`input_blocks.1.1....to_q`). `ldm_to_diffusers` reads the block layout off the
module names alone (which child is a ResBlock, a transformer, a down/upsampler), so one function serves SD1.x,
SD2, SDXL and toy UNets without a config. Files are written atomically and never silently overwritten.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .adapter import LoraWeights

PREFIX = "lora_unet_"
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
          "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
BASIC = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
         "out.0": "conv_norm_out", "out.2": "conv_out"}
_PEFT = re.compile(r"\.(base_layer|lora_[A-Za-z_]+)(\.|$)")  # peft wrapper internals: not UNet modules
_ALL_NAMES = "pass every module name: ldm_to_diffusers(n for n, _ in unet.named_modules())"


def _kind(names: set[str], p: str) -> str | None:
    """What the module at path p is, judged by its children's names (ldm's own)."""
    for child, kind in (("in_layers", "res"), ("transformer_blocks", "attn"), ("proj_in", "attn"), ("op", "down"), ("conv", "up")):
        if f"{p}.{child}" in names:
            return kind
    return None


def _sub(rest: str, kind: str) -> str | None:
    """Diffusers sub-path inside a block for the ldm sub-path `rest` ('' = the block itself); None = no counterpart."""
    if kind == "attn":  # transformer internals keep their names in diffusers
        return rest
    if kind == "res":
        return rest if rest == "" else RESNET.get(rest)
    return "" if rest == "" else ("conv" if rest in ("op", "conv") else None)


def _block_indices(names: set[str], part: str) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.match(rf"{part}\.(\d+)(\.|$)", n))})


def _children(names: set[str], p: str) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.match(rf"{re.escape(p)}\.(\d+)(\.|$)", n))})


def ldm_to_diffusers(module_paths: Iterable[str]) -> dict[str, str]:
    """{ldm module path: diffusers module path} for every module of an SD UNet that has a diffusers counterpart.

    The layout comes from the names: input block i whose child 0 has an `op` is a Downsample and closes a
    level; an output block child with a `conv` is an Upsample and closes a level. So the names must cover
    every block (all of `named_modules()`), else the level boundaries are unknowable: a partial list that
    skips a block raises instead of guessing. Containers with no diffusers counterpart (`input_blocks.1`,
    `in_layers`, SiLU/Dropout slots) are left out.
    """
    names = {n for n in module_paths if not _PEFT.search(n)}
    names |= {n.rsplit(".", k)[0] for n in list(names) for k in range(1, n.count(".") + 1)}  # parents are implied
    out: dict[str, str] = {}
    blocks: dict[str, str] = {}  # ldm block path -> diffusers block path

    def fail(what: str) -> ValueError:
        return ValueError(f"cannot read the UNet layout from these module names: {what}; {_ALL_NAMES}.")

    level, r = 0, 0
    inputs = _block_indices(names, "input_blocks")
    if inputs and inputs != list(range(inputs[-1] + 1)):
        raise fail(f"input blocks {sorted(set(range(inputs[-1] + 1)) - set(inputs))} are missing")
    for i in inputs[1:]:
        kinds = [_kind(names, f"input_blocks.{i}.{c}") for c in _children(names, f"input_blocks.{i}")]
        if kinds[:1] == ["down"]:
            blocks[f"input_blocks.{i}.0"] = f"down_blocks.{level}.downsamplers.0"
            level, r = level + 1, 0
            continue
        if not kinds or kinds[0] != "res" or any(k != "attn" for k in kinds[1:]):
            raise fail(f"input_blocks.{i} holds {kinds}, expected a ResBlock (+ transformer) or a Downsample")
        blocks[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{r}"
        if len(kinds) > 1:
            blocks[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{r}"
        r += 1
    down_levels = level + 1 if inputs[1:] else 0

    mid = [_kind(names, f"middle_block.{c}") for c in _children(names, "middle_block")]
    for c, kind in enumerate(mid):
        if kind not in ("res", "attn"):
            raise fail(f"middle_block.{c} is neither a ResBlock nor a transformer")
        slot = "attentions.0" if kind == "attn" else f"resnets.{mid[:c].count('res')}"
        blocks[f"middle_block.{c}"] = f"mid_block.{slot}"

    outputs = _block_indices(names, "output_blocks")
    if outputs and outputs != list(range(outputs[-1] + 1)):
        raise fail(f"output blocks {sorted(set(range(outputs[-1] + 1)) - set(outputs))} are missing")
    level, r = 0, 0
    for i in outputs:
        kinds = [_kind(names, f"output_blocks.{i}.{c}") for c in _children(names, f"output_blocks.{i}")]
        if not kinds or kinds[0] != "res" or any(k not in ("attn", "up") for k in kinds[1:]) or "up" in kinds[1:-1]:
            raise fail(f"output_blocks.{i} holds {kinds}, expected a ResBlock (+ transformer) (+ Upsample)")
        blocks[f"output_blocks.{i}.0"] = f"up_blocks.{level}.resnets.{r}"
        if "attn" in kinds:
            blocks[f"output_blocks.{i}.1"] = f"up_blocks.{level}.attentions.{r}"
        r += 1
        if kinds[-1] == "up":
            blocks[f"output_blocks.{i}.{len(kinds) - 1}"] = f"up_blocks.{level}.upsamplers.0"
            level, r = level + 1, 0
    if outputs and down_levels and level + 1 != down_levels:
        raise fail(f"{down_levels} down levels but {level + 1} up levels")

    for n in names:
        if n in BASIC:
            out[n] = BASIC[n]
            continue
        m = re.match(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)(?:\.(.*))?$", n)
        if m and m.group(1) in blocks:
            block = blocks[m.group(1)]
            kind = "attn" if ".attentions." in block else "res" if ".resnets." in block else "resample"
            sub = _sub(m.group(2) or "", kind)
            if sub is not None:
                out[n] = f"{block}.{sub}" if sub else block
    return out


def kohya_module_names(net) -> dict[str, str]:
    """{module path: the path its kohya key spells} for any network the trainer adapts.

    SD UNets: diffusers names (`ldm_to_diffusers`). Flux and SD3: the network's own (BFL / SAI MMDiT) names,
    which is how kohya's sd-scripts names Flux and SD3 LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`,
    `lora_unet_joint_blocks_0_x_block_attn_qkv`) and what ComfyUI's loader maps for every model."""
    from .adapter import model_family

    paths = [n for n, _ in net.named_modules()]
    if model_family(net) == "unet":
        return ldm_to_diffusers(paths)
    return {n: n for n in paths if n and not _PEFT.search(n)}


def kohya_name(diffusers_path: str) -> str:
    return PREFIX + diffusers_path.replace(".", "_")


def to_kohya(weights: Mapping[str, LoraWeights], names: Mapping[str, str],
             dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """{ldm path: LoraWeights} -> kohya state dict (lora_down/lora_up in `dtype`, alpha as a 0-d float32)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"LoRA save dtype must be float32, float16 or bfloat16, got {dtype}.")
    missing = [p for p in weights if p not in names]
    if missing:
        raise ValueError(f"no diffusers name for adapted modules {missing[:3]} ({len(missing)} in all); "
                         f"{_ALL_NAMES} of the same UNet the LoRA was trained on.")
    keys = {p: kohya_name(names[p]) for p in weights}
    dupes = [k for k, c in Counter(keys.values()).items() if c > 1]
    if dupes:
        raise ValueError(f"two adapted modules map to the same kohya key {dupes[0]!r}; the name map is broken.")

    def put(t: Tensor) -> Tensor:  # own storage: safetensors refuses shared tensors
        return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()

    sd: dict[str, Tensor] = {}
    for p, w in weights.items():
        sd[f"{keys[p]}.lora_down.weight"] = put(w.down)
        sd[f"{keys[p]}.lora_up.weight"] = put(w.up)
        sd[f"{keys[p]}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)  # loaders read it with .item()
    return sd


def from_kohya(tensors: Mapping[str, Tensor], names: Mapping[str, str]) -> dict[str, LoraWeights]:
    """Kohya state dict -> {ldm path: LoraWeights}; tensors keep their stored dtype. Missing alpha = rank (scale 1)."""
    by_kohya = {kohya_name(d): p for p, d in names.items()}
    groups: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = re.match(r"(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
        if not m or m.group(1) not in by_kohya:
            unknown.append(key)
            continue
        groups.setdefault(by_kohya[m.group(1)], {})[m.group(2).split(".")[0]] = t
    if unknown:
        hint = ("it holds text-encoder weights (lora_te*), which CAT neither trains nor loads"
                if any(k.startswith("lora_te") for k in unknown) else
                "only kohya-format UNet LoRAs (lora_unet_*.lora_down/lora_up/alpha) for this model's layout are read")
        raise ValueError(f"{len(unknown)} LoRA keys name no module of this UNet (e.g. {unknown[:3]}): {hint}.")
    out = {}
    for p, g in groups.items():
        if "lora_down" not in g or "lora_up" not in g:
            raise ValueError(f"LoRA for {p} lacks its {'lora_up' if 'lora_down' in g else 'lora_down'} weight; "
                             "the file is incomplete.")
        rank = g["lora_down"].shape[0]
        out[p] = LoraWeights(g["lora_down"], g["lora_up"], float(g["alpha"]) if "alpha" in g else float(rank))
    return out


def save_lora(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str],
              overwrite: bool = False) -> Path:
    """Write a .safetensors atomically: temp file in the same folder, fsync, then a rename.

    Without overwrite an existing file is never replaced, even by a writer racing us (hard link fails if
    the name exists); a crash leaves either the old file or the new one, never half of one.
    """
    from safetensors.torch import save

    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; {bad[:3]} do not (json.dumps the value).")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it or choose a free name "
                              f"(next_free_path gives one).")
    data = save(dict(tensors), metadata=dict(metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666, not mkstemp: mkstemp makes 0600 files, which other users of a shared server
    # cannot load; this way the umask decides, as for any file the user writes.
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic no-clobber
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while saving; pass overwrite=True or choose a free name.") from None
            except OSError:  # filesystem without hard links
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True or choose a free name.") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def next_free_path(directory: str | os.PathLike, stem: str) -> Path:
    """directory/stem_NNNNN.safetensors, one past the highest number already there (gaps are not refilled)."""
    directory = Path(directory)
    pat = re.compile(rf"{re.escape(stem)}_(\d{{5,}})\.safetensors$")
    used = [int(m.group(1)) for f in (directory.iterdir() if directory.is_dir() else ()) if (m := pat.match(f.name))]
    return directory / f"{stem}_{max(used, default=0) + 1:05d}.safetensors"


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a .safetensors file, in one open."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_lora(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a .safetensors LoRA."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist; check the path (ComfyUI keeps LoRAs in models/loras).")
    try:
        return read_safetensors(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e}); only safetensors LoRAs are read "
                         "(convert .pt/.ckpt LoRAs with kohya's tools first).") from e


def training_metadata(*, cat_factor: float, triggers: Iterable[str], preservation: str, class_word: str = "",
                      steps: int, rank: int, alpha: float, lr: float, seed: int = 0, num_images: int = 0,
                      resolution: int | tuple[int, int] = 512, target_preset: str = "attn", base_model: str = "",
                      base_model_version: str = "", output_name: str = "", comment: str = "",
                      captions: Iterable[str] = (), steps_done: int | None = None,
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Kohya's ss_* header keys (what A1111/Forge and LoRA browsers show) plus CAT's own cat_* keys; all str."""
    from . import __version__

    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_learning_rate": str(lr), "ss_max_train_steps": str(steps), "ss_num_train_images": str(num_images),
        "ss_resolution": f"({w}, {h})", "ss_seed": str(seed), "ss_sd_model_name": base_model,
        "ss_base_model_version": base_model_version, "ss_training_comment": comment, "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps({"cat": dict(tags)}),
        "cat_factor": str(float(cat_factor)), "cat_triggers": json.dumps(list(triggers)),
        "cat_preservation": preservation, "cat_class_word": class_word,
        "cat_steps": str(steps if steps_done is None else steps_done), "cat_target_preset": target_preset,
        "cat_version": __version__,
    }
    meta.update(extra or {})
    return meta
