"""Which dtype the training forward computes in, given where the model lives and how it is stored.

The rules: base weights stay in the dtype the user loaded; LoRA weights and optimizer state are
fp32; the forward runs in the compute dtype (autocast). `auto` is bf16 on GPUs that have it, fp16
(with a grad scaler) on older GPUs, and on the CPU the storage dtype when it is bf16 (no fp32 copy
of a bf16 model), otherwise fp32.
"""
from __future__ import annotations

import torch

CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(choice: str, device: torch.device | str, storage: torch.dtype,
                  bf16_supported: bool = True) -> torch.dtype:
    device = torch.device(device)
    if choice not in CHOICES:
        raise ValueError(f"compute dtype must be one of {', '.join(CHOICES)}, got {choice!r}.")
    if choice == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if storage == torch.bfloat16 else torch.float32
        return torch.bfloat16 if bf16_supported else torch.float16
    dt = _BY_NAME[choice]
    if device.type == "cpu" and dt == torch.float16:
        raise ValueError("fp16 compute needs a GPU (the CPU has no fast fp16 kernels and no grad scaler); "
                         "choose bf16 or fp32 on the CPU.")
    if dt == torch.bfloat16 and not bf16_supported:
        raise ValueError(f"this device ({device}) has no bf16 support; choose fp16 (with a grad scaler) or fp32.")
    return dt


def mixed_precision_name(dtype: torch.dtype) -> str:
    """TrainConfig.mixed_precision for a compute dtype ('no' = plain fp32)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
