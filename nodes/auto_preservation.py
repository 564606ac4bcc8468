"""The Auto Preservation node: the leak scan inside the training run (cat_train/terms/auto.py) for the CAT Loss Config
node.

A separate node so a graph without it stays as it was: the Loss Config's optional `auto` input, its last, takes it.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..cat_train.terms.auto_checks import RULES
from ..cat_train.terms.auto_config import SOURCES, AutoPreservationConfig
from ..cat_train.options import help_of
from .common import CATEGORY, AutoOptions
from .compat import advanced, search_aliases

_D = AutoPreservationConfig()


class AutoPreservationNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_AutoPreservation", display_name="Auto Preservation", category=CATEGORY,
            **search_aliases("prior preservation probes", "concept drift", "leak probes"),
            description="Every N steps, measures how far each probe class drifted (frozen vs adapted prediction at "
                        "fixed noise, no sampling) and adds the worst to the CAT preservation prompts for the rest of "
                        "the run. The live view and the LoRA's metadata name the probes added.",
            inputs=[
                io.Int.Input("every", default=50, min=0, max=100000, tooltip=help_of(AutoPreservationConfig, "every")),
                io.Combo.Input("source", options=list(SOURCES), default="common",
                               tooltip=help_of(AutoPreservationConfig, "source")),
                io.String.Input("probes", default="", multiline=True,
                                tooltip=help_of(AutoPreservationConfig, "probes")),
                io.Int.Input("top_k", default=_D.top_k, min=1, max=100,
                             tooltip=help_of(AutoPreservationConfig, "top_k")),
                io.Float.Input("threshold", default=_D.threshold, min=0.0, max=10.0, step=0.001,
                               tooltip=help_of(AutoPreservationConfig, "threshold")),
                io.Int.Input("points", default=_D.points, min=1, max=64, optional=True,
                             **advanced(io.Int), tooltip=help_of(AutoPreservationConfig, "points")),
                io.Int.Input("images", default=_D.images, min=0, max=10000, optional=True,
                             **advanced(io.Int), tooltip=help_of(AutoPreservationConfig, "images")),
                io.Int.Input("seed", default=_D.seed, min=0, max=2**31 - 1, optional=True,
                             **advanced(io.Int), tooltip=help_of(AutoPreservationConfig, "seed")),
                # after seed: graphs saved before them keep their widget values in place
                io.Int.Input("neighbours", default=_D.neighbours, min=1, max=100, optional=True,
                             **advanced(io.Int), tooltip=help_of(AutoPreservationConfig, "neighbours")),
                io.Combo.Input("rule", options=list(RULES), default=_D.rule, optional=True,
                               **advanced(io.Combo), tooltip=help_of(AutoPreservationConfig, "rule")),
                io.Int.Input("first", default=_D.first, min=0, max=100000, optional=True,
                             **advanced(io.Int), tooltip=help_of(AutoPreservationConfig, "first")),
            ],
            outputs=[AutoOptions.Output(display_name="auto")],
        )

    @classmethod
    def execute(cls, every, source, probes, top_k, threshold, **kw) -> io.NodeOutput:
        words = tuple(line.strip() for line in (probes or "").splitlines() if line.strip())
        return io.NodeOutput(AutoPreservationConfig(every=every, source=source, probes=words, top_k=top_k,
                                                    threshold=threshold,
                                                    **{k: v for k, v in kw.items() if v is not None}))


NODES = [AutoPreservationNode]
