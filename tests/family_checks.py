"""What every model family in cat_train/families/ must hold on its tiny model (no pytest here: the host-agnostic
test and the ComfyUI one call it with their own imports of the pack)."""
from __future__ import annotations

import re

import torch


def check_family(F, A, E, family, net: torch.nn.Module) -> dict[str, int]:
    """F, A, E: the pack's families, adapter and export modules. Returns counts for the test's message."""
    # detected from its own model, by exactly one family
    assert [f for f in F.FAMILIES if f.detect(net)] == [family], [f.name for f in F.FAMILIES if f.detect(net)]
    assert F.of(net) is family

    # every target choice adapts existing Linear/Conv2d layers, every suffix names one, each choice adds to the last
    layers = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    previous: list[str] = []
    for choice, suffixes in family.targets.items():
        for s in suffixes:
            assert any(n == s or n.endswith("." + s) for n in layers), (f"{family.name} target {choice}: {s} names no "
                                                                        "layer")
        chosen = A.target_modules(net, A.LoraSpec(preset=choice))
        assert set(previous) < set(chosen), (choice, len(previous), len(chosen))
        previous = chosen
    for generic in F.GENERIC_TARGETS:  # the trainer's attn/attn_ff/full pick the family's own choices
        own = family.target_choice(generic)
        assert own in family.targets, (family.name, generic, own)
        assert A.target_modules(net, A.LoraSpec(preset=generic)) == A.target_modules(net, A.LoraSpec(preset=own))

    # kohya names: one key per adapted layer, and a LoRA survives to_kohya -> from_kohya unchanged
    names = family.kohya_names(net)
    full = A.target_modules(net, A.LoraSpec(preset=family.target_choice("full")))
    A.inject_lora(net, A.LoraSpec(rank=2, alpha=3.0, preset=family.target_choice("full")))
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in A.lora_layers(net).values():
                for p in A._adapter_params(layer):
                    p.copy_(torch.randn(p.shape, generator=g))
        assert family.kohya_names(net) == names  # peft's wrappers in the tree change no name
        weights = A.lora_weights(net)
    finally:
        A.remove_lora(net)
    assert sorted(weights) == sorted(full)
    sd = E.to_kohya(weights, names)
    keys = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert len(keys) == len(full) and all(k.startswith("lora_unet_") for k in keys)
    back = E.from_kohya(sd, names)
    assert sorted(back) == sorted(weights)
    for p, w in weights.items():
        assert torch.equal(back[p].down, w.down) and torch.equal(back[p].up, w.up) and back[p].alpha == w.alpha

    # checkpoint units and in-place norms are modules of this network
    own = {id(m) for m in net.modules()}
    units = family.checkpoint_units(net)
    assert units and all(id(u) in own for u in units)
    assert all(id(n) in own for n in family.inplace_norms(net))

    # APT's default layers, where the family has them, name modules of this network
    names_all = [n for n, _ in net.named_modules() if n]
    if family.apt_stabilize_layers is not None:
        assert any(re.fullmatch(family.apt_stabilize_layers, n) for n in names_all)
    if family.apt_align_layers is not None:
        mods = dict(net.named_modules())
        assert any(re.fullmatch(family.apt_align_layers, n) and hasattr(mods[n], "to_q") for n in names_all)
    return {"layers": len(full), "units": len(units)}
