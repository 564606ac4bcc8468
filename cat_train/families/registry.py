"""Every family, in the order the trainer offers their target choices, and the lookups over them."""
from __future__ import annotations

from torch import nn

from .dits import HiDream, Lumina2, QwenImage, Wan, ZImage
from .family import Family
from .flux import Chroma, Flux, Flux2
from .unets import SD3, SDUNet, SDXLUNet

# In this order the target choices are offered (the trainer node's `target` list).
FAMILIES: tuple[type[Family], ...] = (SDUNet, SDXLUNet, Flux, Flux2, Chroma, QwenImage, SD3, Lumina2, ZImage, Wan,
                                      HiDream)
TARGETS: dict[str, tuple[str, ...]] = {c: s for f in FAMILIES for c, s in f.targets.items()}


def of(net: nn.Module) -> type[Family]:
    """The family of a network, read off its module tree; a network of no family is refused by name."""
    found = [f for f in FAMILIES if f.detect(net)]
    if len(found) != 1:
        what = "several families (" + ", ".join(f.name for f in found) + ")" if found else "no family"
        raise ValueError(f"{type(net).__name__} matches {what} CAT knows ({', '.join(f.name for f in FAMILIES)}): "
                         f"train a model of one of them ({', '.join(f.title for f in FAMILIES)}), or add its family "
                         "to cat_train/families/.")
    return found[0]


def target_suffixes(choice: str) -> tuple[str, ...]:
    """Module-path suffixes of a target choice as named (no family resolution)."""
    return TARGETS[choice]


def kohya_base_version(config_class_names) -> str | None:
    """kohya's ss_base_model_version for the first of these host config class names (a class and its bases,
    most specific first) that a family knows; None if none does."""
    for name in config_class_names:
        for f in FAMILIES:
            if name in f.base_versions:
                return f.base_versions[name]
    return None


def named(name: str | None) -> type[Family] | None:
    """The family a run recorded by its name (None: unknown or none)."""
    return next((f for f in FAMILIES if f.name == name), None)


def title(name: str | None) -> str:
    """What users call the family of that name: "SD1.x/SD2"; "unknown" for None."""
    family = named(name)
    return family.title if family else "unknown" if name is None else str(name)
