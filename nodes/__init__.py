"""ComfyUI-CAT nodes (V3 API): one module per node family, each a schema and a short `execute` over its work.
Ids are prefixed CAT_ so they never clash with built-ins; the shared socket types and helpers are in common.py."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import (apt, auto_preservation, catversion, dataset, early_cancel, evaluate, leak_scan, lora_family_warning,
               loss_config,
               save_lora, trainer, training_options)

log = logging.getLogger("ComfyUI-CAT")


class CatExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        catversion.register_folder()  # models/catversion, before Apply CatVersion lists its files
        _register_server_hooks()
        return [*dataset.NODES, *loss_config.NODES, *trainer.NODES, *save_lora.NODES, *evaluate.NODES, *leak_scan.NODES,
                *apt.NODES, *catversion.NODES, *auto_preservation.NODES,
                *training_options.NODES]


def _register_server_hooks() -> None:
    """Hooks on ComfyUI's server (absent when ComfyUI runs without one, e.g. in-process tests)."""
    try:
        from server import PromptServer
    except Exception:  # no server module, or one `import nodes` shadowed (comfy/utils.py): no server to hook
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        lora_family_warning.register(server)
        if not early_cancel.register(server):
            log.warning("ComfyUI-CAT: the server's app already runs; a Cancel sent before a run starts is not kept")


async def comfy_entrypoint() -> ComfyExtension:
    return CatExtension()
