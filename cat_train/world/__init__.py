"""The proving ground: a small world we control, and the tools that measure the methods on it.

    generator.py  procedural 32 px coloured shapes and their captions
    model.py, text.py, pretrain.py  the base text-to-image model (an SD-architecture UNet)
    clip.py       the world-CLIP that scores images
    bench.py      `python -m cat_train bench kps`: the methods side by side (PS, IS, KPS, leak, drift)
    demo.py       `python -m cat_train demo`: plain LoRA vs CAT, grid, table, LoRA files, best step
    watch.py      the demo's validation, previews and per-step scores, through the trainer's hooks
    unet.py       the reference SD UNet with ComfyUI's parameter names (world model, tests, benchmarks)
    toytext.py    a hashing text encoder for tests

Weights are committed beside the code and regenerate from their seeds. May import every part of the method;
the method never imports from here."""
