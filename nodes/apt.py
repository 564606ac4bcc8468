"""The APT Options node: APT's three parts (arXiv 2507.02687, cat_train/terms/apt.py) for the CAT Loss Config node.

A separate node so a graph without APT stays as it was: the Loss Config's optional `apt` input takes it.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..cat_train.terms.apt_config import AUGMENT_OPS, AptConfig
from ..cat_train.terms.apt_config import FILLS, FORMS, STATS, pattern_problem
from ..cat_train.options import help_of
from .common import CATEGORY, AptOptions, range_problem
from .compat import advanced, search_aliases

_D = AptConfig()


class AptOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_AptOptions", display_name="APT Options", category=CATEGORY,
            **search_aliases("adaptive personalized training", "anti overfitting", "attention alignment"),
            description="Adaptive Personalized Training (Chae et al., CVPR 2025) for the CAT Loss Config: "
                        "per-timestep-bin overfitting indicator setting loss weight and augmentation, "
                        "feature-statistics stabilization, cross-attention alignment, in the paper's form by default "
                        "(form, zoom_out, fill, stabilize_stat, stabilize_normalize select this pack's earlier "
                        "choices). Each weight 0 = off; all combine with the CAT factor.",
            inputs=[
                io.Float.Input("adaptive", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip=help_of(AptConfig, "adaptive")),
                io.Float.Input("stabilize", default=5.0, min=0.0, max=1e4, step=0.1,
                               tooltip=help_of(AptConfig, "stabilize")),
                io.Float.Input("align", default=1000.0, min=0.0, max=1e6, step=1.0,
                               tooltip=help_of(AptConfig, "align")),
                io.Int.Input("bins", default=_D.bins, min=1, max=100, tooltip=help_of(AptConfig, "bins")),
                io.String.Input("augment", default=", ".join(_D.augment_ops),
                                tooltip=help_of(AptConfig, "augment_ops")),
                io.Float.Input("ema", default=_D.ema, min=0.0, max=0.999, step=0.01, optional=True,
                               **advanced(io.Float), tooltip=help_of(AptConfig, "ema")),
                io.Float.Input("target", default=_D.target, min=0.0, max=0.99, step=0.01, optional=True,
                               **advanced(io.Float), tooltip=help_of(AptConfig, "target")),
                io.Float.Input("min_weight", default=_D.min_weight, min=0.01, max=1.0, step=0.01, optional=True,
                               **advanced(io.Float), tooltip=help_of(AptConfig, "min_weight")),
                io.Float.Input("max_augment", default=_D.max_augment, min=0.0, max=1.0, step=0.01, optional=True,
                               **advanced(io.Float), tooltip=help_of(AptConfig, "max_augment")),
                io.Combo.Input("align_distance", options=["mse", "kl"], default=_D.align_distance, optional=True,
                               **advanced(io.Combo), tooltip=help_of(AptConfig, "align_distance")),
                io.String.Input("stabilize_layers", default=_D.stabilize_layers, optional=True,
                                **advanced(io.String), tooltip=help_of(AptConfig, "stabilize_layers")),
                io.String.Input("align_layers", default=_D.align_layers, optional=True,
                                **advanced(io.String), tooltip=help_of(AptConfig, "align_layers")),
                # appended: the paper's form and this pack's earlier choices (graphs saved before load with the
                # defaults)
                io.Combo.Input("form", options=list(FORMS), default=_D.form, optional=True,
                               **advanced(io.Combo), tooltip=help_of(AptConfig, "form")),
                io.Float.Input("zoom_out", default=_D.zoom_out, min=0.0, max=10.0, step=0.05, optional=True,
                               **advanced(io.Float), tooltip=help_of(AptConfig, "zoom_out")),
                io.Combo.Input("fill", options=list(FILLS), default=_D.fill, optional=True,
                               **advanced(io.Combo), tooltip=help_of(AptConfig, "fill")),
                io.Combo.Input("stabilize_stat", options=list(STATS), default=_D.stabilize_stat, optional=True,
                               **advanced(io.Combo), tooltip=help_of(AptConfig, "stabilize_stat")),
                io.Boolean.Input("stabilize_normalize", default=_D.stabilize_normalize, optional=True,
                                 **advanced(io.Boolean), tooltip=help_of(AptConfig, "stabilize_normalize")),
                io.Boolean.Input("align_skip_triggers", default=_D.align_skip_triggers, optional=True,
                                 **advanced(io.Boolean), tooltip=help_of(AptConfig, "align_skip_triggers")),
            ],
            outputs=[AptOptions.Output(display_name="apt")],
        )

    @classmethod
    def validate_inputs(cls, augment="", stabilize_layers=None, align_layers=None):
        # ComfyUI files what this returns under every input named here, so only the three it checks are named: the
        # ranges are ComfyUI's own (each under its input), NaN (which passes them) is refused in execute
        ops = [o.strip() for o in augment.split(",") if o.strip()]
        bad = [o for o in ops if o not in AUGMENT_OPS]
        if bad:
            return f"augment: unknown {', '.join(bad)}; choose from {', '.join(AUGMENT_OPS)}"
        for name, value in (("stabilize_layers", stabilize_layers), ("align_layers", align_layers)):
            problem = pattern_problem(name, value)  # a bare re.error named no field
            if problem:
                return problem
        return True

    @classmethod
    def execute(cls, adaptive, stabilize, align, bins, augment, **kw) -> io.NodeOutput:
        problem = range_problem(cls, adaptive=adaptive, stabilize=stabilize, align=align, bins=bins, **kw)
        if problem is not True:  # NaN, which ComfyUI's range check lets through
            raise ValueError(f"APT Options: {problem}")
        ops = tuple(o.strip() for o in augment.split(",") if o.strip())
        return io.NodeOutput(AptConfig(adaptive=adaptive, stabilize=stabilize, align=align, bins=bins, augment_ops=ops,
                                       **{k: v for k, v in kw.items() if v is not None}))


NODES = [AptOptionsNode]
