"""The UNet and MMDiT families of Stable Diffusion: SD1.x/SD2, SDXL, SD3/SD3.5."""
from __future__ import annotations



from .ldm_names import ldm_to_diffusers
from .family import Family


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
