"""LoRA files the nodes write: the header metadata of a trained LoRA, the trainer's mid-run LoRA writer, and the
Save CAT LoRA node. File names and the LORA object are lora_io's (loadable without ComfyUI); the format itself
(kohya keys, atomic writes, metadata keys) is cat_train.adapters.export's."""
from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from comfy_api.latest import io

from ..cat_train.adapters.export import save_lora, to_kohya
from ..cat_train.training.header import lora_header
from ..cat_train.training.run_folder import check_space, writable_folder
from .comfy_model import base_model_version, family_of
from .common import CATEGORY
from .compat import search_aliases
from .lora_io import name_problem, safe_lora_path

log = logging.getLogger("ComfyUI-CAT")


def metadata(loss_cfg, spec, cfg, dataset, steps_done: int, history: list[dict], base_version: str = "",
             base_model: str = "", output_name: str = "") -> dict[str, str]:
    """The trained LoRA's header (cat_train.training.header) for a run on this dataset: base_model is the checkpoint
    file, output_name the name the LoRA is saved under."""
    resolution = max(dataset.buckets, key=lambda wh: wh[0] * wh[1]) if dataset.buckets else (0, 0)
    return lora_header(loss_cfg, spec, cfg, triggers=dataset.triggers, captions=[it[1] for it in dataset.items],
                       resolution=resolution, steps_done=steps_done, history=history, base_version=base_version,
                       base_model=base_model, output_name=output_name)


def step_lora_writer(mp, folder, name: str, loss_cfg, spec, cfg, dataset, base_model: str = ""):
    """on_save for train(): `<folder>/<name>_stepNNNNNN.safetensors`, a LoRA any loader reads, with metadata; returns
    the path (the trainer names the best step's file).

    Its `run_folder(folder)` (train's on_own_folder) renames the run's step LoRAs after the checkpoint folder it was
    given when another run owns `name`'s (`<name>_<run id>`): two runs with one checkpoint_name on two servers sharing
    an output folder wrote the same step names, and the second writer's no-clobber save stopped its run."""
    names = family_of(mp).kohya_names(mp.model.diffusion_model)
    version = base_model_version(mp)
    stem_of = [name]

    def write(step: int, weights):
        stem = f"{stem_of[0]}_step{step:06d}"
        meta = metadata(loss_cfg, spec, cfg, dataset, step, [], version, base_model, stem)
        tensors = to_kohya(weights, names)
        for _ in range(100):  # a writer racing us took the free name between the look and the write: the next one
            try:
                path = save_lora(safe_lora_path(folder, stem), tensors, meta)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free name for {stem}.safetensors in {folder} after 100 tries; other writers "
                                  "keep taking them: give this run its own checkpoint_name.")
        log.info("ComfyUI-CAT: step %d LoRA written to %s", step, path)
        return path

    def run_folder(own: Path) -> None:
        stem_of[0] = str(PurePosixPath(name.strip()).with_name(own.name))
    write.run_folder = run_folder
    return write


def check_lora_folder(folder, need_bytes: int, field: str) -> None:
    """Before any work: the loras folder can be written and has room for one LoRA (a read-only or full models/loras
    used to fail after training, or at the first mid-run save)."""

    fix = (f"free space there, or point ComfyUI's loras folder (extra_model_paths.yaml) elsewhere; {field} picks the "
           "name.")
    writable_folder(Path(folder), "loras folder", fix)
    check_space(Path(folder), need_bytes + 2**20, "loras folder", fix)


def loras_folder() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


class SaveCatLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_SaveLora", display_name="Save CAT LoRA", category=CATEGORY, is_output_node=True,
            **search_aliases("save lora", "export lora"),
            description="Writes the LoRA (kohya keys + training metadata) into the loras folder; never overwrites.",
            inputs=[io.LoraModel.Input("lora"), io.String.Input("name", default="cat_lora")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        return name_problem(loras_folder(), name, "LoRA name", "the loras folder", "my_concept")

    @classmethod
    def execute(cls, lora, name) -> io.NodeOutput:
        check_lora_folder(loras_folder(), sum(t.numel() * t.element_size() for t in lora.values()), "name")
        # the name chosen here, as kohya's --output_name
        meta = {**getattr(lora, "metadata", {}), "ss_output_name": name.strip()}
        path = save_lora(safe_lora_path(loras_folder(), name), dict(lora), meta)
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


NODES = [SaveCatLoraNode]
