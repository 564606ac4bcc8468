"""Flux.1 and the families ComfyUI builds on its Flux network: Flux.2 (dev, Klein) and Chroma."""
from __future__ import annotations



from .family import Family


class Flux(Family):
    """Flux (BFL's double- and single-stream blocks, ComfyUI's module names)."""
    name = "flux"
    title = "Flux"
    flow_matching = True
    # single blocks fuse attention and MLP: linear1 = qkv + MLP in, linear2 = attention out + MLP out
    _attn = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "linear1", "linear2")
    _mlp = ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")  # double blocks' MLPs
    _mod = ("img_mod.lin", "txt_mod.lin", "modulation.lin")  # adaLN modulation
    targets = {"flux_attn": _attn, "flux_attn_mlp": _attn + _mlp, "flux_full": _attn + _mlp + _mod}
    generic = {"attn": "flux_attn", "attn_ff": "flux_attn_mlp", "full": "flux_full"}
    base_versions = {"Flux": "flux1"}  # kohya's sd-scripts writes "flux1"
    training_guidance = 1.0  # Flux dev's guidance input while training: kohya's recommended --guidance_scale 1.0
    lora_tags = ("flux",)

    @classmethod
    def detect(cls, net):
        return ((hasattr(net, "double_blocks") or hasattr(net, "single_blocks")) and not Flux2.detect(net)
                and not Chroma.detect(net))

    @classmethod
    def lora_keys_say(cls, keys):
        return any("double_blocks" in k or "single_blocks" in k for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return (any(k.startswith(("double_blocks.", "single_blocks.")) for k in tensors)
                and not Flux2.checkpoint_says(tensors) and not Chroma.checkpoint_says(tensors))

    @classmethod
    def checkpoint_units(cls, net):
        return [*net.double_blocks, *net.single_blocks]

    @classmethod
    def inplace_norms(cls, net):
        # ComfyUI's blocks do `txt += ...` (double) and `x += ...` (single) after a LayerNorm read that tensor; in
        # v0.33 (not v0.3.64) the double blocks update `img` in place too (`img += ...` after img_norm1/img_norm2)
        return ([n for b in net.double_blocks for n in (b.img_norm1, b.img_norm2, b.txt_norm1, b.txt_norm2)]
                + [b.pre_norm for b in net.single_blocks])


class Flux2(Flux):
    """Flux.2 dev and Klein (BFL): Flux's double/single blocks with one modulation shared by all blocks of a kind
    (`double_stream_modulation_img/txt`, `single_stream_modulation`) instead of one per block, no biases, a SiLU-gated
    MLP, no pooled vector; ComfyUI runs it on its Flux class."""
    name = "flux2"
    title = "Flux.2"
    _mod = ("double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin")
    targets = {"flux2_attn": Flux._attn, "flux2_attn_mlp": Flux._attn + Flux._mlp,
               "flux2_full": Flux._attn + Flux._mlp + _mod}
    generic = {"attn": "flux2_attn", "attn_ff": "flux2_attn_mlp", "full": "flux2_full"}
    base_versions = {"Flux2": "flux2"}
    lora_tags = ("flux2", "flux.2", "flux_2")
    # Flux.2 dev's guidance input while training, as Flux dev's (Klein has none)
    training_guidance = 1.0

    @classmethod
    def detect(cls, net):
        return hasattr(net, "double_blocks") and hasattr(net, "double_stream_modulation_img")

    @classmethod
    def lora_keys_say(cls, keys):
        return any("stream_modulation" in k for k in keys)  # a file of attention/MLP layers alone reads as Flux

    @classmethod
    def checkpoint_says(cls, tensors):
        return "double_stream_modulation_img.lin.weight" in tensors


class Chroma(Flux):
    """Chroma (Lodestone's de-distilled Flux schnell): Flux's double/single blocks without per-block modulation, which a
    small MLP (`distilled_guidance_layer`, the approximator) computes for all blocks from timestep and guidance; T5
    alone, no pooled vector."""
    name = "chroma"
    title = "Chroma"
    _approximator = ("distilled_guidance_layer.in_proj", "in_layer", "out_layer", "distilled_guidance_layer.out_proj")
    targets = {"chroma_attn": Flux._attn, "chroma_attn_mlp": Flux._attn + Flux._mlp,
               "chroma_full": Flux._attn + Flux._mlp + _approximator}
    generic = {"attn": "chroma_attn", "attn_ff": "chroma_attn_mlp", "full": "chroma_full"}
    base_versions = {"Chroma": "chroma"}
    lora_tags = ("chroma",)
    training_guidance = 0.0  # its guidance input as ComfyUI's Chroma samples it (model_base.Chroma's default)
    # T5 captions are as long as they are, and in joint attention a repeated text would weigh k times against the
    # image tokens: padded and masked instead
    padded_text = True

    @classmethod
    def detect(cls, net):
        return hasattr(net, "double_blocks") and hasattr(net, "distilled_guidance_layer")

    @classmethod
    def lora_keys_say(cls, keys):
        return any("distilled_guidance_layer" in k for k in keys)  # a file of block layers alone reads as Flux

    @classmethod
    def checkpoint_says(cls, tensors):
        return any(k.startswith("distilled_guidance_layer.") for k in tensors)
