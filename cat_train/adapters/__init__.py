"""What is trained: the adapter kinds, LoRA through peft with its algorithms, kohya files, and CatVersion.

    registry.py    which adapter a spec asks for (the shape of ComfyUI's comfy/weight_adapter)
    lora.py        LoRA on a UNet through peft, and LoraAdapter (the loop's adapter)
    algorithms.py  LoRA, DoRA, LoHa, LoKr: one class each (peft config, tensors, file keys)
    export.py      kohya LoRA files: keys, atomic writes, header keys; StorageError
    catversion/    CatVersion's K/V embeddings in the text encoder (its trainer: training/catversion.py)

May import step (the Adapter protocol, conditionings), families (LoRA targets, kohya names) and options.
"""
