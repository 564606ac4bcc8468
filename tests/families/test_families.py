"""Each model family is consistent on its tiny model (host-agnostic families: built from the world UNet; the
transformer families need ComfyUI's classes and are checked in tests/comfy/test_families_comfy.py)."""
import pytest
import torch

from cat_train.adapters import lora as A
from cat_train.adapters import export as E
from cat_train import families as F
from cat_train.terms.apt_config import AptConfig
from cat_train.world.unet import TINY_CONFIG, UNet
from family_checks import check_family

TINY_SDXL = dict(TINY_CONFIG, transformer_depth=(0, 1), use_linear_in_transformer=True, adm_in_channels=24)
TINY = {F.SDUNet: lambda: UNet(**TINY_CONFIG), F.SDXLUNet: lambda: UNet(**TINY_SDXL)}


@pytest.mark.parametrize("family", list(TINY), ids=lambda f: f.name)
def test_family_holds_on_its_tiny_model(family):
    torch.manual_seed(0)
    counts = check_family(F, A, E, family, TINY[family]())
    assert counts["layers"] > 10 and counts["units"] > 4


def test_every_family_has_a_tiny_model_somewhere():
    from pathlib import Path

    comfy_test = (Path(__file__).parents[1] / "comfy" / "test_families_comfy.py").read_text()
    for f in F.FAMILIES:  # host-agnostic here, or by ComfyUI's classes in the ComfyUI test
        assert f in TINY or f"\"{f.__name__}\":" in comfy_test, f"{f.__name__} has no tiny test model"


def test_unknown_network_is_refused_by_name():
    with pytest.raises(ValueError, match="Sequential matches no family CAT knows .*cat_train/families/"):
        F.of(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_target_choices_and_tags_are_unambiguous():
    assert list(F.TARGETS)[:3] == list(F.GENERIC_TARGETS)  # the trainer node's order: UNet choices first
    tags = [name for f in F.FAMILIES for name in f.base_versions]
    assert len(tags) == len(set(tags))
    assert F.kohya_base_version(["TinySD15", "SD15", "BaseModel"]) == "sd_v1"
    assert F.kohya_base_version(["SSD1B", "SDXL"]) == "sdxl_base_v1-0"
    assert F.kohya_base_version(["WAN21"]) is None
    # APT's defaults are the SD UNets' layers
    assert AptConfig().stabilize_layers == F.SDUNet.apt_stabilize_layers
    assert AptConfig().align_layers == F.SDUNet.apt_align_layers
