"""One class per model family: all the trainer knows about an architecture, in one place.

A family says how to recognise its network (by the module tree alone, never by a host's classes), its LoRA
files (the kohya base-version tag and key names in a safetensors header) and its checkpoints (the denoiser's
tensor names), what users call it, which module paths each LoRA target choice adapts, how kohya spells its
LoRA keys, which layers gradient checkpointing wraps, which norms need a copy of their input while training,
the kohya base-version tag of its checkpoints and APT's default layers. Adding a family = one class in FAMILIES,
one line in nodes/comfy_model.py (which of ComfyUI's model classes it was written for), a tiny model in
tests/test_families.py (or tests/comfy/test_families_comfy.py when only the host can build one) and a row in
docs/families.md.
Style model: k-diffusion's external.py, one small class per model family.
"""
from __future__ import annotations

import re
from typing import ClassVar

from torch import nn

from .ldm_names import ldm_to_diffusers

# peft wrapper internals: not the network's modules
_PEFT = re.compile(r"\.(base_layer|lora_[A-Za-z_]+|hada_\w+|lokr_\w+)(\.|$)")
GENERIC_TARGETS = ("attn", "attn_ff", "full")  # the trainer's choices every family answers with its own


class Family:
    """An architecture as the trainer sees it. Used as a class (no instances): `families.of(net).kohya_names(net)`."""

    name: ClassVar[str]               # its key in run settings and messages: "this {name} model"
    title: ClassVar[str]              # what users call it: "SD1.x/SD2"
    flow_matching: ClassVar[bool]     # its checkpoints sample as rectified flow (else DDPM eps/v)
    # target choice -> module-path suffixes it adapts; each choice includes the ones before it
    targets: ClassVar[dict[str, tuple[str, ...]]]
    generic: ClassVar[dict[str, str]] = {}    # 'attn'/'attn_ff'/'full' -> this family's own choice
    # host model-config class name (ComfyUI's supported_models) -> kohya's ss_base_model_version
    base_versions: ClassVar[dict[str, str]] = {}
    # APT's default regexes (full match of module names); None: APT has no default layers for this family
    apt_stabilize_layers: ClassVar[str | None] = None
    apt_align_layers: ClassVar[str | None] = None
    apt_block_layers: ClassVar[str | None] = None  # stabilize_layers of the earlier (block-output) choice
    # ss_base_model_version prefixes of its LoRAs (kohya's sd-scripts, and this pack's own `base_versions`)
    lora_tags: ClassVar[tuple[str, ...]] = ()
    # its networks' distilled guidance input while training (None: no such input)
    training_guidance: ClassVar[float | None] = None
    # its text sequences are batched by zero-padding with an attention mask (else by repeating each whole)
    padded_text: ClassVar[bool] = False

    @classmethod
    def detect(cls, net: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def lora_keys_say(cls, keys: list[str]) -> bool:
        """Whether a LoRA's tensor names are ones only this family's LoRAs have (a file without a version tag)."""
        return False

    @classmethod
    def checkpoint_says(cls, tensors: dict[str, object]) -> bool:
        """Whether a checkpoint's denoiser tensors ({name without "model.diffusion_model.": header entry}) are this
        family's network."""
        return False

    @classmethod
    def target_choice(cls, choice: str) -> str:
        """The choice that applies on this family: 'attn'/'attn_ff'/'full' become the family's own."""
        return cls.generic.get(choice, choice)

    @classmethod
    def preset_hint(cls) -> str:
        return ", ".join(GENERIC_TARGETS) + (f" or {cls.name}_*" if cls.generic else "")

    @classmethod
    def kohya_names(cls, net: nn.Module) -> dict[str, str]:
        """{module path: the path its kohya key spells}: the network's own names, as kohya's sd-scripts
        names Flux and SD3 LoRAs (`lora_unet_double_blocks_0_img_attn_qkv`) and ComfyUI's loader maps."""
        return {n: n for n, _ in net.named_modules() if n and not _PEFT.search(n)}

    @classmethod
    def checkpoint_units(cls, net: nn.Module) -> list[nn.Module]:
        """The layers gradient checkpointing wraps, one by one."""
        raise NotImplementedError

    @classmethod
    def inplace_norms(cls, net: nn.Module) -> list[nn.Module]:
        """Norms whose input the network then updates in place: autograd refuses that once the norm saved
        the tensor for backward, so while training they get a copy of their input."""
        return []


class SDUNet(Family):
    """SD1.x/SD2 ldm UNets (and the world model's UNet, built the same way): no ADM input."""
    name = "sd"
    title = "SD1.x/SD2"
    flow_matching = False
    _attn = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
    _ff = ("ff.net.0.proj", "ff.net.2")  # feed-forward of each transformer block
    _rest = ("proj_in", "proj_out",  # transformer in/out projections
             "in_layers.2", "out_layers.3", "skip_connection",
             "emb_layers.1")  # resnets: conv1, conv2, conv_shortcut, time_emb_proj
    targets = {"attn": _attn, "attn_ff": _attn + _ff, "full": _attn + _ff + _rest}
    base_versions = {"SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SD21UnclipH": "sd_v2"}
    # self-attention modules: the authors' figure regularizes self-attention features
    apt_stabilize_layers = r".*\.attn1"
    # this pack's earlier choice: middle and decoder block outputs
    apt_block_layers = r"middle_block|output_blocks\.\d+"
    apt_align_layers = r".*\.attn2"  # cross-attention modules
    lora_tags = ("sd_v1", "sd_v2", "sd_2")

    @classmethod
    def detect(cls, net):
        return (all(hasattr(net, a) for a in ("input_blocks", "middle_block", "output_blocks"))
                and not hasattr(net, "label_emb"))

    @classmethod
    def checkpoint_says(cls, tensors):
        return any(k.startswith("input_blocks.") for k in tensors) and "label_emb.0.0.weight" not in tensors

    @classmethod
    def kohya_names(cls, net):
        """Diffusers names (`ldm_to_diffusers`): kohya keys of SD UNets spell diffusers module paths."""
        return ldm_to_diffusers(n for n, _ in net.named_modules())

    @classmethod
    def checkpoint_units(cls, net):
        # ldm calls each layer of a block, never the block itself
        return [layer for block in [*net.input_blocks, net.middle_block, *net.output_blocks] for layer in block]


class SDXLUNet(SDUNet):
    """SDXL-shaped ldm UNets: the SD UNet plus an ADM input (`label_emb`: pooled text and size conditioning). SD2
    unCLIP has one too and is trained alike; its kohya tag comes from its config class (`kohya_base_version`)."""
    name = "sdxl"
    title = "SDXL"
    base_versions = {"SDXL": "sdxl_base_v1-0", "SDXLRefiner": "sdxl_refiner_v1-0", "SSD1B": "sdxl_base_v1-0"}
    lora_tags = ("sdxl",)
    adm_widths = (2816, 2560)  # label_emb input of SDXL base / refiner (SD2 unCLIP has one of another width)

    @classmethod
    def detect(cls, net):
        return all(hasattr(net, a) for a in ("input_blocks", "middle_block", "output_blocks", "label_emb"))

    @classmethod
    def lora_keys_say(cls, keys):
        return any(k.startswith("lora_te2_") for k in keys)  # its second text encoder

    @classmethod
    def checkpoint_says(cls, tensors):
        adm = tensors.get("label_emb.0.0.weight")
        shape = adm.get("shape", []) if isinstance(adm, dict) else []
        return (any(k.startswith("input_blocks.") for k in tensors) and len(shape) == 2
                and shape[1] in cls.adm_widths)


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


class QwenImage(Family):
    """Qwen-Image (Alibaba's MMDiT: one stream of joint blocks, image and text each with its own projections, norms,
    MLP and modulation; ComfyUI's module names, which are diffusers')."""
    name = "qwen_image"
    title = "Qwen-Image"
    flow_matching = True
    _attn = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # image stream
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")  # text stream
    _mlp = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    _mod = ("img_mod.1", "txt_mod.1")  # adaLN modulation
    targets = {"qwen_attn": _attn, "qwen_attn_mlp": _attn + _mlp, "qwen_full": _attn + _mlp + _mod}
    generic = {"attn": "qwen_attn", "attn_ff": "qwen_attn_mlp", "full": "qwen_full"}
    base_versions = {"QwenImage": "qwen_image"}  # musubi-tuner's tag
    lora_tags = ("qwen_image", "qwen-image")
    # its text sequences are padded with an attention mask, not repeated: the text tokens' rotary positions count
    padded_text = True

    @classmethod
    def detect(cls, net):
        return all(hasattr(net, a) for a in ("transformer_blocks", "txt_norm", "img_in", "time_text_embed"))

    @classmethod
    def lora_keys_say(cls, keys):
        return any("transformer_blocks" in k and ("img_mlp" in k or "txt_mod" in k or "to_add_out" in k) for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return "txt_norm.weight" in tensors and any(k.startswith("transformer_blocks.") for k in tensors)

    @classmethod
    def checkpoint_units(cls, net):
        return list(net.transformer_blocks)


class SD3(Family):
    """SD3/SD3.5 MMDiT (SAI's joint blocks, ComfyUI's module names)."""
    name = "sd3"
    title = "SD3"
    flow_matching = True
    _attn = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj")  # x and context blocks (attn2: SD3.5M)
    _mlp = ("mlp.fc1", "mlp.fc2")
    _mod = ("adaLN_modulation.1",)
    targets = {"sd3_attn": _attn, "sd3_attn_mlp": _attn + _mlp, "sd3_full": _attn + _mlp + _mod}
    generic = {"attn": "sd3_attn", "attn_ff": "sd3_attn_mlp", "full": "sd3_full"}
    base_versions = {"SD3": "sd3"}  # kohya's sd-scripts writes "sd3"
    lora_tags = ("sd3",)

    @classmethod
    def detect(cls, net):
        return hasattr(net, "joint_blocks")

    @classmethod
    def lora_keys_say(cls, keys):
        return any("joint_blocks" in k for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return any(k.startswith("joint_blocks.") for k in tensors)

    @classmethod
    def checkpoint_units(cls, net):
        return list(net.joint_blocks)


# In this order the target choices are offered (the trainer node's `target` list).
FAMILIES: tuple[type[Family], ...] = (SDUNet, SDXLUNet, Flux, Flux2, Chroma, QwenImage, SD3)
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
