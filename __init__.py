"""ComfyUI-CAT: ComfyUI loads this package from custom_nodes/ and asks it for nodes.

Outside ComfyUI (plain `import cat_train`, pytest collecting this folder) nothing here may fail,
so the node entry point is imported only when ComfyUI's API is importable.
"""
try:
    import comfy_api  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_api = None

WEB_DIRECTORY = "./web"

if comfy_api is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"] if comfy_api is not None else ["WEB_DIRECTORY"]
