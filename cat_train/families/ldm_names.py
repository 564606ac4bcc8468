"""ldm module names of an SD UNet -> the diffusers names kohya's LoRA keys spell.

`ldm_to_diffusers` reads the block layout off the module names alone (which child is a ResBlock, a
transformer, a down/upsampler), so one function serves SD1.x, SD2, SDXL and toy UNets without a config.
The SD UNet families (cat_train/families/) name their kohya keys with it.
"""
from __future__ import annotations

import re
from typing import Iterable

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
          "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
BASIC = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
         "out.0": "conv_norm_out", "out.2": "conv_out"}
# peft wrapper internals: not UNet modules
_PEFT = re.compile(r"\.(base_layer|lora_[A-Za-z_]+|hada_\w+|lokr_\w+)(\.|$)")
_ALL_NAMES = "pass every module name: ldm_to_diffusers(n for n, _ in unet.named_modules())"


def _kind(names: set[str], p: str) -> str | None:
    """What the module at path p is, judged by its children's names (ldm's own)."""
    for child, kind in (("in_layers", "res"), ("transformer_blocks", "attn"), ("proj_in", "attn"), ("op", "down"),
                        ("conv", "up")):
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
