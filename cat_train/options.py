"""Options are dataclass fields, and each field's metadata is the one place that says two things about it.

`help`: what it means (peft's LoraConfig style). `python -m cat_train options-doc` renders that text into
docs/options.md (`--check` only compares), and the ComfyUI nodes take their widget tooltips from it through
`help_of`, so the doc, the tooltip and the code cannot drift apart.

`recorded`: when a run records it (`recorded`, absent: always). A run's recorded settings name its checkpoint folder
and are what a resume compares (training/run_folder.py), so a rule may only leave out a value that does not change
the trained weights, or the value every run before the option existed had (their folders and checkpoints must still
read as the same run).

A leaf: nothing here imports the method (the option classes are found by name when the doc is rendered), so every
option class can import its rules.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "options.md"
REGENERATE = "python -m cat_train options-doc"

# (module, class, heading): the user-facing option dataclasses, in the order the doc lists them
OPTION_CLASSES = [
    ("cat_train.training.config", "CatLossConfig", "Loss"),
    ("cat_train.adapters.lora", "LoraSpec", "LoRA"),
    ("cat_train.training.config", "TrainConfig", "Training"),
    ("cat_train.terms.apt_config", "AptConfig", "APT"),
    ("cat_train.terms.auto_config", "AutoPreservationConfig", "Auto preservation"),
    ("cat_train.adapters.catversion.spec", "CatVersionSpec", "CatVersion embeddings"),
    ("cat_train.training.catversion", "CatVersionConfig", "CatVersion training"),
]

# node id -> (widget, "Class.field") for every widget that sets an option; its tooltip is that field's help.
# Widgets missing here are the node's own (file names, dtype, masks, ...) and keep their own tooltip.
NODE_WIDGETS: dict[str, list[tuple[str, str]]] = {
    "CAT_LossConfig": [("cat_factor", "CatLossConfig.alpha"), ("preservation", "CatLossConfig.preservation"),
                       ("class_word", "CatLossConfig.class_word"), ("token_weights", "CatLossConfig.token_weights"),
                       ("preservation_prompts", "CatLossConfig.preservation_prompts"), ("apt", "CatLossConfig.apt"),
                       ("auto", "CatLossConfig.auto"), ("keep_every", "CatLossConfig.keep_every"),
                       ("keep_fraction", "CatLossConfig.keep_fraction"),
                       ("keep_estimator", "CatLossConfig.keep_estimator")],
    "CAT_LoraTrainer": [("rank", "LoraSpec.rank"), ("lora_alpha", "LoraSpec.alpha"), ("target", "LoraSpec.preset"),
                        ("steps", "TrainConfig.steps"), ("learning_rate", "TrainConfig.lr"),
                        ("lr_schedule", "TrainConfig.lr_schedule"), ("batch_size", "TrainConfig.batch_size"),
                        ("grad_accum", "TrainConfig.grad_accum"), ("seed", "TrainConfig.seed"),
                        ("gradient_checkpointing", "TrainConfig.gradient_checkpointing"),
                        ("save_every", "TrainConfig.save_every")],
    "CAT_AptOptions": [("adaptive", "AptConfig.adaptive"), ("stabilize", "AptConfig.stabilize"),
                       ("align", "AptConfig.align"), ("bins", "AptConfig.bins"), ("augment", "AptConfig.augment_ops"),
                       ("ema", "AptConfig.ema"), ("target", "AptConfig.target"), ("min_weight", "AptConfig.min_weight"),
                       ("max_augment", "AptConfig.max_augment"), ("align_distance", "AptConfig.align_distance"),
                       ("stabilize_layers", "AptConfig.stabilize_layers"), ("align_layers", "AptConfig.align_layers")],
    "CAT_AutoPreservation": [("every", "AutoPreservationConfig.every"), ("source", "AutoPreservationConfig.source"),
                             ("probes", "AutoPreservationConfig.probes"), ("top_k", "AutoPreservationConfig.top_k"),
                             ("threshold", "AutoPreservationConfig.threshold"),
                             ("points", "AutoPreservationConfig.points"),
                             ("images", "AutoPreservationConfig.images"), ("seed", "AutoPreservationConfig.seed"),
                             ("neighbours", "AutoPreservationConfig.neighbours"),
                             ("rule", "AutoPreservationConfig.rule"), ("first", "AutoPreservationConfig.first")],
    "CAT_CatVersionTrainer": [("layers", "CatVersionSpec.layers"), ("embeddings_per_layer", "CatVersionSpec.length"),
                              ("steps", "CatVersionConfig.steps"), ("learning_rate", "CatVersionConfig.lr"),
                              ("batch_size", "CatVersionConfig.batch_size"), ("cat_factor", "CatVersionConfig.alpha"),
                              ("class_word", "CatVersionConfig.class_word"), ("seed", "CatVersionConfig.seed")],
}

# The CAT Training Options node's widgets, in order: (option class, its fields that are widgets there). The node
# (nodes/training_options.py) builds each widget from its field; a feature appends its own entry.
TRAINING_OPTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("LoraSpec", ("algorithm",)),
    ("TrainConfig",
     ("caption_dropout", "shuffle_tags", "keep_tags", "caption_variants", "timestep_min", "timestep_max")),
    ("CatLossConfig", ("min_snr_gamma",)),
    ("TrainConfig", ("ema_decay", "ema_start_step")),
    ("CatLossConfig", ("mask_floor", "mask_keep")),
]
NODE_WIDGETS["CAT_TrainingOptions"] = [(n, f"{c}.{n}") for c, names in TRAINING_OPTIONS for n in names]


def help_of(cls: type, name: str) -> str:
    """The documented meaning of option `name` of dataclass `cls` (what a node shows as the widget's tooltip)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no option {name!r}; its options are: {', '.join(fields)}.")
    text = fields[name].metadata.get("help", "").strip()
    if not text:
        raise KeyError(f"{cls.__name__}.{name} has no help text: add metadata={{'help': ...}} to its field.")
    return text


# When a run records an option: rule(options, value, default) -> bool, as the field's metadata "recorded".
def NEVER(options, value, default) -> bool:
    """Where files go and how often, where it runs, how gradients are recomputed: the same weights either way."""
    return False


def CHANGED(options, value, default) -> bool:
    """Added after runs began recording their settings: left out while at its default, as those runs had it."""
    return value != default


def changed_while(switch: str):
    """CHANGED, and only while the option `switch` is on: its settings change nothing while it is off."""
    return lambda options, value, default: value != default and bool(getattr(options, switch))


def when(holds):
    """Only while holds(options): e.g. the step count, which changes the weights through a cosine schedule alone."""
    return lambda options, value, default: bool(holds(options))


def recorded(options) -> dict:
    """asdict of an option dataclass as a run records it: each field kept or left out by its "recorded" rule."""
    out = dataclasses.asdict(options)
    for f in dataclasses.fields(options):
        rule = f.metadata.get("recorded")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if rule is not None and not rule(options, out[f.name], default):
            del out[f.name]
    return out


def option_classes() -> dict[str, type]:
    # relative to this package: inside ComfyUI the pack's folder, not `cat_train`, is the top-level name
    return {name: getattr(importlib.import_module(mod.replace("cat_train", "", 1), __package__), name)
            for mod, name, _ in OPTION_CLASSES}


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        factory = f.default_factory
        value = f"{factory.__name__}()" if dataclasses.is_dataclass(factory) else repr(factory())
    elif f.default is dataclasses.MISSING:
        return "(required)"
    elif isinstance(f.default, str):
        value = f"'{f.default}'"  # as written in the source: a regex default keeps its single backslashes
    else:
        value = repr(f.default)
    return f"`{value}`"


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if code else text.replace("<", "&lt;")  # '<checkpoint name>' would read as an HTML tag


def render() -> str:
    classes = option_classes()
    out = ["# Options",
           "",
           f"Generated by `{REGENERATE}` from the `help` metadata of each option's dataclass field: edit the text "
           "there,",
           "then regenerate (`tests/test_options_doc.py` fails while this file is stale). The ComfyUI widgets that set",
           "an option show the same text as their tooltip (table at the end).",
           ""]
    for mod, name, heading in OPTION_CLASSES:
        cls = classes[name]
        where = Path(sys.modules[cls.__module__].__file__).resolve().relative_to(ROOT).as_posix()
        out += [f"## {heading}: `{name}` (`{where}`)", "",
                "| option | default | meaning |", "|---|---|---|"]
        out += [f"| `{f.name}` | {_cell(_default(f), code=True)} | {_cell(help_of(cls, f.name))} |"
                for f in dataclasses.fields(cls)]
        out.append("")
    out += ["## In ComfyUI: the widget that sets each option", "",
            "Widget defaults are the node's own: the APT Options node starts with adaptive 1, stabilize 5 and align "
            "1000",
            "(the dataclass: all 0 = off); the Auto Preservation node with every 50 and source `common` (the "
            "dataclass:",
            "every 0 = off, source `list`). Widgets not listed (file and folder names, the trainer's `dtype`, "
            "`checkpoint_name`",
            "and `resume_from`, the dataset, KPS Evaluator and Leak Scan inputs) are the node's own and documented by",
            "their tooltips.", "",
            "| node | widget | option |", "|---|---|---|"]
    for node, widgets in NODE_WIDGETS.items():
        out += [f"| `{node}` | `{w}` | `{opt}` |" for w, opt in widgets]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train options-doc",
                                 description="render every option's help into docs/options.md")
    ap.add_argument("--out", default=str(DOC), help="where to write (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs from the rendering")
    a = ap.parse_args(argv)
    text, path = render(), Path(a.out)
    if a.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{path} is current")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
