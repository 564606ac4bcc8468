"""The CAT Training Options node: what LoRA trainers take for granted beyond the trainer's own widgets (adapter
algorithm, caption dropout, timestep weighting, EMA, masks), on one "advanced" node so a graph without it stays as
it was: the trainer's optional `options` input takes it.

Each widget is an option dataclass field listed in GROUPS, built from that field (its help is the tooltip; `min`,
`max`, `step` and `choices` in its metadata are the widget's), so an option is declared and documented once. The
node outputs {class name: {field: value}}; the trainer passes each class's entries to the config it builds.
"""
from __future__ import annotations

import dataclasses
import typing

from comfy_api.latest import io

from ..cat_train.options import TRAINING_OPTIONS, help_of, option_classes
from .common import CATEGORY, TrainingOptions, range_problem
from .compat import search_aliases

# (option dataclass, its fields that are widgets here), in widget order: cat_train/options_doc.TRAINING_OPTIONS
GROUPS: list[tuple[type, tuple[str, ...]]] = [(option_classes()[c], names) for c, names in TRAINING_OPTIONS]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def widget(cls: type, name: str) -> io.Input:
    """The widget of option `cls.name`: its kind from the default's type (or the field's Literal choices)."""
    f = _fields(cls)[name]
    meta, tip = f.metadata, help_of(cls, name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    hint = typing.get_type_hints(cls).get(name)
    choices = meta.get("choices") or (typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None)
    if choices:
        return io.Combo.Input(name, options=list(choices), default=default, optional=True, tooltip=tip)
    if isinstance(default, bool):
        return io.Boolean.Input(name, default=default, optional=True, tooltip=tip)
    if isinstance(default, int):
        return io.Int.Input(name, default=default, min=meta.get("min", 0), max=meta.get("max", 100000), optional=True,
                            tooltip=tip)
    if isinstance(default, float):
        return io.Float.Input(name, default=default, min=meta.get("min", 0.0), max=meta.get("max", 1e6),
                              step=meta.get("step", 0.01), optional=True, tooltip=tip)
    return io.String.Input(name, default=str(default), optional=True, tooltip=tip)


def owner(name: str) -> type:
    return next(cls for cls, names in GROUPS if name in names)


class TrainingOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_TrainingOptions", display_name="CAT Training Options", category=CATEGORY,
            **search_aliases("lora algorithm", "loha", "lokr", "dora", "ema", "caption dropout"),
            description="Advanced trainer options for the CAT LoRA Trainer's optional `options` input; unconnected, "
                        "the trainer uses each option's default (docs/options.md).",
            inputs=[widget(c, n) for c, names in GROUPS for n in names],
            outputs=[TrainingOptions.Output(display_name="options")],
        )

    @classmethod
    def validate_inputs(cls, algorithm=None):
        # ComfyUI files what this returns under every input it takes (with **kw: all 20, for one wrong value), so it
        # takes only the one ComfyUI 0.3.64 does not check itself (a V3 combo's choices; 0.33 checks them too); the
        # ranges are ComfyUI's, each under its input, and NaN, which they let through, is refused in execute
        (spec,) = [i for i in cls.define_schema().inputs if i.id == "algorithm"]
        if algorithm is not None and algorithm not in spec.options:
            return f"algorithm {algorithm!r} is not one of {', '.join(map(str, spec.options))}."
        return True

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        problem = range_problem(cls, **kw)
        if problem is not True:
            raise ValueError(f"CAT Training Options: {problem}")
        out: dict[str, dict] = {}
        for name, value in kw.items():
            if value is not None:
                out.setdefault(owner(name).__name__, {})[name] = value
        return io.NodeOutput(out)


def options_for(options: dict | None, cls: type) -> dict:
    """The entries a CAT Training Options node set for dataclass `cls` (none when unconnected)."""
    return dict((options or {}).get(cls.__name__, {}))


NODES = [TrainingOptionsNode]
