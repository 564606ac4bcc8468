"""Contrastive Adapter Training (CAT) for Stable Diffusion LoRAs, host-agnostic.

    denoiser.py  the protocol a trainer needs (module, predict, prediction type, noise schedule)
    lora.py   LoRA via peft: inject, switch off for the frozen pass, read, load, remove
    algorithms.py  LoRA, DoRA, LoHa, LoKr: one class each (peft config, tensors, file keys)
    loss.py      the CAT objective (cat_objective) and its config
    train.py     the training loop, checkpoints and exact resume
    plugins.py   the loop's two plug points: Adapter (what is trained), StepTerm (a regularizer in the step)
    adapters.py  LoRA as an Adapter, and the adapter a spec asks for
    regularizers.py  the StepTerms a CatLossConfig switches on (APT: apt.py, settings in apt_config.py)
    catversion.py  CatVersion: K/V embeddings in the text encoder, an Adapter that encodes prompts each step
    prompts.py   trigger words and the preservation prompt y
    export.py    kohya-key .safetensors LoRA files with training metadata
    metrics.py   PS, IS and KPS over CLIP embeddings
    dataset.py   kohya-style image folders, captions, aspect buckets

`world/` is the proving ground the methods are measured on, not part of any method: a procedural
world, its base model and CLIP, the KPS benchmark, the demo, a sampler, the reference SD UNet and a
toy text encoder used by tests and benchmarks.

Nothing here imports ComfyUI; `nodes/` adapts ComfyUI's ModelPatcher to `denoiser.Denoiser`.
"""

__version__ = "0.1.0"
