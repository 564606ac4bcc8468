"""What a trained LoRA file's header says about its run: one function, for the nodes and any script.

kohya's ss_* keys (what A1111/Forge and LoRA browsers show) and CAT's cat_* keys: the objective's settings, every
term's settings on or off (`terms.registry.metadata`, with what the run decided, e.g. the probes auto preservation
added), the caption and timestep options, and the algorithm's LyCORIS keys for LoHa, LoKr and DoRA.
"""
from __future__ import annotations

import json
from typing import Sequence

from ..adapters.algorithms import ALGORITHMS
from ..adapters.export import training_metadata
from ..adapters.lora import LoraSpec
from ..data.captions import metadata as caption_metadata
from ..terms import registry
from .config import CatLossConfig, TrainConfig

COMMENT = "Contrastive Adapter Training (CAT, arXiv 2404.07554), ComfyUI-CAT"


def lora_header(loss_cfg: CatLossConfig, spec: LoraSpec, cfg: TrainConfig, *, triggers: Sequence[str],
                captions: Sequence[str], resolution: tuple[int, int], steps_done: int, history: Sequence[dict] = (),
                base_version: str = "", base_model: str = "", output_name: str = "",
                comment: str = COMMENT) -> dict[str, str]:
    """The header of a LoRA trained with these settings on images with these captions (`resolution`: the largest
    bucket's (width, height)). history: the run's rows (empty for mid-run step files); base_version: kohya's
    ss_base_model_version (`families.kohya_base_version`); base_model: the checkpoint file (ss_sd_model_name);
    output_name: the name the LoRA is saved under (ss_output_name). LoRA managers show the last two."""
    class_word = loss_cfg.class_word if isinstance(loss_cfg.class_word, str) else json.dumps(loss_cfg.class_word)
    return training_metadata(
        cat_factor=loss_cfg.alpha, triggers=triggers, preservation=loss_cfg.preservation, class_word=class_word,
        steps=cfg.steps, steps_done=steps_done, rank=spec.rank, alpha=spec.alpha, lr=cfg.lr, seed=cfg.seed,
        num_images=len(captions), target_preset=spec.preset, resolution=resolution, base_model_version=base_version,
        base_model=base_model, output_name=output_name, captions=captions, comment=comment,
        extra={"ss_lr_scheduler": cfg.lr_schedule,
               "cat_preservation_prompts": json.dumps(list(loss_cfg.preservation_prompts)),
               "cat_final_loss": f"{history[-1]['loss']:.6g}" if history else "",
               "cat_keep_every": str(loss_cfg.keep_every), "cat_keep_fraction": str(float(loss_cfg.keep_fraction)),
               **registry.metadata(loss_cfg, cfg, history), **caption_metadata(cfg), **timestep_range(cfg),
               **ALGORITHMS[spec.algorithm].metadata()})  # LyCORIS's ss_network_module/args for LoHa, LoKr, DoRA


def timestep_range(cfg: TrainConfig) -> dict[str, str]:
    """The timestep range (kohya records no key for its min/max_timestep: CAT's own names)."""
    return {"cat_timestep_min": str(int(cfg.timestep_min)), "cat_timestep_max": str(int(cfg.timestep_max))}
