"""The CAT objective as the loop calls it for a LoRA run: the frozen model is the network with the LoRA switched off."""
from cat_train.adapters.lora import adapter_disabled
from cat_train.step.objective import cat_objective


def objective(denoiser, *args, **kwargs):
    return cat_objective(denoiser, lambda: adapter_disabled(denoiser.module), *args, **kwargs)
