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
__version__ = "0.1.0"
