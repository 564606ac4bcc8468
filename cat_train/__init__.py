"""Contrastive Adapter Training (CAT) for Stable Diffusion adapters, host-agnostic: the method in parts.

    step/       one CAT step: the Denoiser protocol, the objective, the plug points (Adapter, term roles)
    families/   one class per model family with everything known about it
    adapters/   what is trained: LoRA (and DoRA, LoHa, LoKr) through peft, kohya files, CatVersion
    data/       dataset folders, captions, prompts, images and masks
    measure/    validation, previews, sampling, metrics, best step, leak scan, charts
    terms/      step terms (APT, auto preservation, masks, min-SNR, EMA) and their one registry
    training/   the run: its configuration (the composition root), the loop, checkpoints, run folders
    options.py  every option's help text and when a run records it
    queue/      `python -m cat_train queue`: batch runs through ComfyUI servers
    world/      the proving ground the methods are measured on (the demo, the benchmarks); never imported by them

Each part's docstring says what it may import (docs/architecture.md draws it). Nothing here imports ComfyUI;
`nodes/` adapts ComfyUI's ModelPatcher to `step.denoiser.Denoiser`.
"""
from __future__ import annotations

import re
from pathlib import Path


def _version() -> str:
    """The pack's version as pyproject.toml beside this package says (the registry reads it there too)."""
    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return found.group(1) if found else "unknown"


__version__ = _version()
