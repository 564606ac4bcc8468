"""ComfyUI-CAT nodes (V3 API): one module per node family, each a schema and a short `execute` over its work.
Ids are prefixed CAT_ so they never clash with built-ins; the shared socket types and helpers are in common.py."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import apt, auto_preservation, catversion, dataset, evaluate, leak_scan, loss_config, save_lora, trainer, training_options


class CatExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        catversion.register_folder()  # models/catversion, before Apply CatVersion lists its files
        return [*dataset.NODES, *loss_config.NODES, *trainer.NODES, *save_lora.NODES, *evaluate.NODES, *leak_scan.NODES,
                *apt.NODES, *catversion.NODES, *auto_preservation.NODES,
                *training_options.NODES]


async def comfy_entrypoint() -> ComfyExtension:
    return CatExtension()
