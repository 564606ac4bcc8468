"""The CAT Loss Config node: the CAT factor, how y is made from y_T, per-token weights, APT, auto preservation and
cheaper preservation: keep_every, keep_fraction, keep_estimator (optional inputs, last, so graphs saved before them
still load)."""
from __future__ import annotations

from comfy_api.latest import io

from ..cat_train.training.checks import parse_token_weights
from ..cat_train.training import CatLossConfig
from ..cat_train.options import help_of
from ..cat_train.terms.keep_local import ESTIMATORS
from .common import CATEGORY, AptOptions, AutoOptions, LossConfig
from .compat import advanced, search_aliases


class CatLossConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_LossConfig", display_name="CAT Loss Config", category=CATEGORY,
            **search_aliases("cat factor", "prior preservation", "regularization", "contrastive loss"),
            description="L = ||eps - eps'(z,t,y_T)||^2 + cat_factor * ||eps(z,t,y) - eps'(z,t,y)||^2; cat_factor 0 = "
                        "plain LoRA.",
            inputs=[
                io.Float.Input("cat_factor", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip=help_of(CatLossConfig, "alpha")),
                io.Combo.Input("preservation", options=["class", "strip", "empty"], default="class",
                               tooltip=help_of(CatLossConfig, "preservation")),
                io.String.Input("class_word", default="",
                                tooltip=help_of(CatLossConfig, "class_word")),
                io.String.Input("token_weights", default="", multiline=True, tooltip=help_of(CatLossConfig,
                        "token_weights")),
                io.String.Input("preservation_prompts", default="", multiline=True, optional=True,
                                tooltip=help_of(CatLossConfig, "preservation_prompts")),
                AptOptions.Input("apt", optional=True, tooltip=help_of(CatLossConfig, "apt")),
                AutoOptions.Input("auto", optional=True, tooltip=help_of(CatLossConfig, "auto")),
                io.Int.Input("keep_every", default=1, min=1, max=1000, optional=True,
                             **advanced(io.Int), tooltip=help_of(CatLossConfig, "keep_every")),
                io.Float.Input("keep_fraction", default=1.0, min=0.01, max=1.0, step=0.05, optional=True,
                               **advanced(io.Float), tooltip=help_of(CatLossConfig, "keep_fraction")),
                io.Combo.Input("keep_estimator", options=list(ESTIMATORS), default="exact", optional=True,
                               **advanced(io.Combo), tooltip=help_of(CatLossConfig, "keep_estimator")),
            ],
            outputs=[LossConfig.Output(display_name="loss_config")],
        )

    @classmethod
    def execute(cls, cat_factor, preservation, class_word, token_weights, preservation_prompts="", apt=None,
                auto=None, keep_every=1, keep_fraction=1.0, keep_estimator="exact") -> io.NodeOutput:
        weights = parse_token_weights(token_weights)
        prompts = tuple(line.strip() for line in (preservation_prompts or "").splitlines() if line.strip())
        cfg = CatLossConfig(cat_factor, preservation, class_word.strip(), weights, prompts,
                            **({"apt": apt} if apt is not None else {}), **({"auto": auto} if auto is not None else {}),
                            keep_every=int(keep_every), keep_fraction=float(keep_fraction),
                            keep_estimator=keep_estimator or "exact")
        return io.NodeOutput(cfg)


NODES = [CatLossConfigNode]
