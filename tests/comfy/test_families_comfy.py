"""Each model family is consistent on its tiny model built by ComfyUI's own classes, and ComfyUI's side (which
MODEL trains, its kohya base-version tag) agrees with the family read off the network."""
from __future__ import annotations

import pytest

from conftest import ROOT, pack_module
from tiny_models import tiny_model

KIND = {"SDUNet": "sd15", "SDXLUNet": "sdxl", "SD3": "sd3", "Flux": "flux", "QwenImage": "qwen_image", "Flux2": "flux2",
        "Chroma": "chroma"}
TAG = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1", "qwen_image": "qwen_image",
       "flux2": "flux2", "chroma": "chroma"}
# families an older ComfyUI lacks or cannot train: whether this host trains them, and the pack's one-line refusal
REFUSED_WITHOUT = {
    "QwenImage": (lambda comfy: pack_module(comfy, "nodes.compat").qwen_image_masks_text(),
                  r"^CAT trains Qwen-Image on ComfyUI v0\.33 or newer: [^\n]*$"),
    "Flux2": (lambda comfy: hasattr(__import__("comfy.model_base").model_base, "Flux2"),
              r"^CAT trains Flux\.2 on ComfyUI v0\.33 or newer: [^\n]*$")}
# built as networks only (tiny_models.tiny_network) and checked in their own file, test_families_nextdit_wan.py
NETWORK_KIND = {"Lumina2": "lumina2", "ZImage": "zimage", "Wan": "wan", "HiDream": "hidream"}


@pytest.mark.parametrize("family_name", list(KIND))
def test_family_holds_on_its_comfyui_tiny_model(comfy, family_name):
    import sys

    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from family_checks import check_family

    F, A, E = (pack_module(comfy, f"cat_train.{m}") for m in ("families", "adapters.lora", "adapters.export"))
    cm = pack_module(comfy, "nodes.comfy_model")
    family = getattr(F, family_name)
    mp = tiny_model(KIND[family_name], seed=5)[0]
    trains_here, refusal = REFUSED_WITHOUT.get(family_name, (lambda comfy: True, None))
    if not trains_here(comfy):
        with pytest.raises(ValueError, match=refusal):
            cm.family_of(mp)
        if family_name == "Flux2":  # a stand-in module tree (no Flux.2 in this ComfyUI): nothing more to check
            return
    else:
        assert cm.family_of(mp) is family
    assert cm.base_model_version(mp) == TAG[KIND[family_name]]
    counts = check_family(F, A, E, family, mp.model.diffusion_model)
    assert counts["layers"] >= 8 and counts["units"] >= 2


def test_every_family_is_built_here(comfy):
    F = pack_module(comfy, "cat_train.families")
    # a new family needs its tiny model here
    assert sorted(f.__name__ for f in F.FAMILIES) == sorted({**KIND, **NETWORK_KIND})
