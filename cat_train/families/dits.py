"""The other flow-matching transformers: Qwen-Image, NextDiT (Lumina Image 2.0, Z-Image), Wan (single frames) and
HiDream-I1."""
from __future__ import annotations

import re

from torch import nn

from .family import Family


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


class NextDiT(Family):
    """Alpha-VLLM's NextDiT (ComfyUI's comfy/ldm/lumina): caption and image tokens refined apart (`context_refiner`,
    `noise_refiner`), then joint blocks over both (`layers`). Lumina Image 2.0 and Z-Image are two families of it."""
    flow_matching = True
    whole_prompts = True
    _attn = ("attention.qkv", "attention.out")  # fused qkv: every block, refiners included
    _mlp = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # SwiGLU

    @staticmethod
    def _targets(prefix: str, mod: str) -> dict[str, tuple[str, ...]]:
        """mod: the blocks' adaLN modulation Linear (its index differs between the two)."""
        a, m = NextDiT._attn, NextDiT._mlp
        return {f"{prefix}_attn": a, f"{prefix}_attn_mlp": a + m, f"{prefix}_full": a + m + (mod,)}

    @classmethod
    def _is_nextdit(cls, net) -> bool:
        return all(hasattr(net, a) for a in ("noise_refiner", "context_refiner", "layers", "cap_embedder"))

    @staticmethod
    def _z_modulation(net) -> bool:
        """Z-Image's blocks modulate from a 256-wide embedding through one Linear; Lumina 2's through SiLU + Linear."""
        return isinstance(net.layers[0].adaLN_modulation[0], nn.Linear)

    @classmethod
    def checkpoint_units(cls, net):
        return [*net.noise_refiner, *net.context_refiner, *net.layers]


class Lumina2(NextDiT):
    """Lumina Image 2.0 (Gemma 2 2B captions; shift 6)."""
    name = "lumina2"
    title = "Lumina Image 2.0"
    targets = NextDiT._targets("lumina2", "adaLN_modulation.1")
    generic = {"attn": "lumina2_attn", "attn_ff": "lumina2_attn_mlp", "full": "lumina2_full"}
    base_versions = {"Lumina2": "lumina2"}
    lora_tags = ("lumina",)

    @classmethod
    def detect(cls, net):
        return cls._is_nextdit(net) and not cls._z_modulation(net)

    @classmethod
    def lora_keys_say(cls, keys):
        return any(re.search(r"(^|_)(layers|noise_refiner)_\d+_adaLN_modulation_1", k) for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return "layers.0.adaLN_modulation.1.weight" in tensors and "noise_refiner.0.attention.qkv.weight" in tensors


class ZImage(NextDiT):
    """Z-Image (Tongyi's 6B NextDiT with Qwen3 4B captions; ComfyUI builds it as its Lumina2 model with Z-Image's
    config: 256-wide modulation through one Linear, pad tokens, time scale 1000; shift 3)."""
    name = "zimage"
    title = "Z-Image"
    targets = NextDiT._targets("zimage", "adaLN_modulation.0")
    generic = {"attn": "zimage_attn", "attn_ff": "zimage_attn_mlp", "full": "zimage_full"}
    base_versions = {"ZImage": "zimage"}
    lora_tags = ("zimage", "z_image", "z-image")

    @classmethod
    def detect(cls, net):
        return cls._is_nextdit(net) and cls._z_modulation(net)

    @classmethod
    def lora_keys_say(cls, keys):
        return any(re.search(r"(^|_)(layers|noise_refiner)_\d+_adaLN_modulation_0", k) for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return "layers.0.adaLN_modulation.0.weight" in tensors and "noise_refiner.0.attention.qkv.weight" in tensors


class Wan(Family):
    """Wan 2.1 / 2.2 A14B text-to-video (ComfyUI's WanModel: self- and cross-attention blocks over T5 context), trained
    as an image model: each image a one-frame clip (latent (C, 1, H, W))."""
    name = "wan"
    title = "Wan 2.x (single frame)"
    flow_matching = True
    video = True  # its network takes (B, C, T, H, W): the trainer's (B, C, H, W) latents are one frame
    _attn = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o"))
    _mlp = ("ffn.0", "ffn.2")
    _mod = ("time_projection.1",)  # the blocks' shared modulation (each block adds its own parameter to it)
    targets = {"wan_attn": _attn, "wan_attn_mlp": _attn + _mlp, "wan_full": _attn + _mlp + _mod}
    generic = {"attn": "wan_attn", "attn_ff": "wan_attn_mlp", "full": "wan_full"}
    base_versions = {"WAN21_T2V": "wan_t2v"}
    lora_tags = ("wan",)

    @classmethod
    def detect(cls, net):
        return all(hasattr(net, a) for a in ("blocks", "patch_embedding", "text_embedding", "time_projection"))

    @classmethod
    def lora_keys_say(cls, keys):
        return any(re.search(r"(^|_)blocks_\d+_cross_attn_[qkvo](\.|_|$)", k) for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return "head.modulation" in tensors and "blocks.0.cross_attn.q.weight" in tensors

    @classmethod
    def checkpoint_units(cls, net):
        return list(net.blocks)


class HiDream(Family):
    """HiDream-I1 (ComfyUI's HiDreamImageTransformer2DModel): double- and single-stream blocks whose image feed-forward
    is a mixture of SwiGLU experts; conditioned on T5 (context), CLIP-L+G pooled (y) and Llama 3.1 hidden states of
    every layer (encoder_hidden_states_llama3)."""
    name = "hidream"
    title = "HiDream-I1"
    flow_matching = True
    _attn = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out",  # image stream (all blocks)
             "attn1.to_q_t", "attn1.to_k_t", "attn1.to_v_t", "attn1.to_out_t")  # text stream (double blocks)
    _mlp = ("w1", "w2", "w3")  # every SwiGLU: text, shared and routed experts of the image stream
    _mod = ("adaLN_modulation.1",)
    targets = {"hidream_attn": _attn, "hidream_attn_mlp": _attn + _mlp, "hidream_full": _attn + _mlp + _mod}
    generic = {"attn": "hidream_attn", "attn_ff": "hidream_attn_mlp", "full": "hidream_full"}
    base_versions = {"HiDream": "hidream"}
    lora_tags = ("hidream",)

    @classmethod
    def detect(cls, net):
        return all(hasattr(net, a) for a in ("double_stream_blocks", "single_stream_blocks", "caption_projection"))

    @classmethod
    def lora_keys_say(cls, keys):
        return any("double_stream_blocks" in k or "single_stream_blocks" in k for k in keys)

    @classmethod
    def checkpoint_says(cls, tensors):
        return any(k.startswith(("double_stream_blocks.", "single_stream_blocks.")) for k in tensors)

    @classmethod
    def checkpoint_units(cls, net):
        return [*net.double_stream_blocks, *net.single_stream_blocks]
