"""LoRA files in kohya's format: what ComfyUI's LoraLoader, A1111/Forge and kohya's scripts load.

Kohya keys name diffusers module paths (`lora_unet_down_blocks_0_attentions_0_..._to_q.lora_down.weight`);
our layers carry the network's own names (`input_blocks.1.1....to_q`); each model family's `kohya_names`
(cat_train/families/) gives the map. Files are written atomically and never silently overwritten.
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

from .lora import LoraWeights

PREFIX = "lora_unet_"


class StorageError(OSError):
    """A folder that cannot take the files a run writes (LoRA files, checkpoints); the message names it and the fix."""

    # ComfyUI's error dialog shows "<the class's module>.<its name>: str(error)": under ComfyUI this module is named by
    # the pack's path, and OSError's text starts "[Errno 17] ". The dialog should start with the folder and the fix.
    __module__ = "ComfyUI-CAT"

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


def kohya_name(diffusers_path: str) -> str:
    return PREFIX + diffusers_path.replace(".", "_")


def to_kohya(weights: Mapping[str, LoraWeights], names: Mapping[str, str],
             dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """{ldm path: LoraWeights (or another algorithm's weights)} -> kohya state dict (tensors in `dtype`, alpha as a
    0-d float32). LoHa/LoKr/DoRA keys are LyCORIS's (hada_w*, lokr_w*, dora_scale), which ComfyUI's loader maps."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"LoRA save dtype must be float32, float16 or bfloat16, got {dtype}.")
    missing = [p for p in weights if p not in names]
    if missing:
        raise ValueError(f"no diffusers name for adapted modules {missing[:3]} ({len(missing)} in all); "
                         "pass the names of every module of the network the LoRA was trained on: "
                         "families.of(net).kohya_names(net) (it reads all of net.named_modules()).")
    keys = {p: kohya_name(names[p]) for p in weights}
    dupes = [k for k, c in Counter(keys.values()).items() if c > 1]
    if dupes:
        raise ValueError(f"two adapted modules map to the same kohya key {dupes[0]!r}; the name map is broken.")

    def put(t: Tensor) -> Tensor:  # own storage: safetensors refuses shared tensors
        return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()

    sd: dict[str, Tensor] = {}
    for p, w in weights.items():
        for suffix, t in w.file_tensors().items():  # LoRA: lora_down.weight, lora_up.weight (algorithms.py: the others)
            sd[f"{keys[p]}.{suffix}"] = put(t)
        sd[f"{keys[p]}.alpha"] = torch.tensor(w.file_alpha, dtype=torch.float32)  # loaders read it with .item()
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


def _unwritable(path: Path, e: OSError):
    raise StorageError(e.errno, f"cannot write {path}: its folder is not writable ({e.strerror or e}); make it "
                                "writable or save into another folder.") from None


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _unwritable(path, e)
    # os.open with 0o666, not mkstemp: mkstemp makes 0600 files, which other users of a shared server
    # cannot load; this way the umask decides, as for any file the user writes.
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:  # read-only disk, no permission
            _unwritable(path, e)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: say which file and what to do (the temp file goes in `finally`)
                    raise StorageError(e.errno, f"cannot write {path} ({e.strerror or e}; {len(data) / 2**20:.1f} MB); "
                                        "free space on that disk or save into another folder.") from e
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic no-clobber
            except FileExistsError:
                raise FileExistsError(f"{path} appeared while saving; pass overwrite=True or choose a free "
                                      "name.") from None
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
        raise FileNotFoundError(f"LoRA file {path} does not exist; check the path (ComfyUI keeps LoRAs in "
                                "models/loras).")
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
    from .. import __version__

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
