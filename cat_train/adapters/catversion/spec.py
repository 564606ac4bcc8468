"""CatVersion's spec, and which layers of a text encoder it reaches (and whether a file's embeddings fit one)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

from torch import nn

PAPER_LAYERS = 3  # last 3 of CLIP ViT-L/14's 12 layers in the released adapters


@dataclass
class CatVersionSpec:
    layers: int | tuple[int, ...] = field(default=PAPER_LAYERS, metadata={"help": (
        "int N: the last N self-attention layers that feed the output (the paper: 3); a tuple: explicit layer "
        "indices.")})
    length: int = field(default=1, metadata={"help": "embeddings per layer, the prefix length (the paper: 1)."})
    init: Literal["normal", "zeros"] = field(default="normal", metadata={"help": (
        "`normal`: N(0, init_std²) as the reference code (randn); or `zeros`.")})
    init_std: float = field(default=1.0, metadata={"help": "standard deviation of the `normal` init."})
    prefix_bias: float = field(default=0.0, metadata={"help": (
        "added to the prefix columns' attention logits (the authors' code: +1, from ones concatenated to an additive "
        "mask; 0: an ordinary key). Stored in the file, so Apply CatVersion uses what training used.")})

    def __post_init__(self):
        if isinstance(self.layers, int):
            if self.layers < 1:
                raise ValueError(f"layers must be >= 1 (the paper: the last {PAPER_LAYERS}), got {self.layers}.")
        else:
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise ValueError("layers must name at least one self-attention layer.")
        if self.length < 1:
            raise ValueError(f"length (embeddings per layer) must be >= 1 (the paper: 1), got {self.length}.")
        if self.init not in ("normal", "zeros"):
            raise ValueError(f"init must be 'normal' or 'zeros', got {self.init!r}.")


# ---------------------------------------------------------------- finding the layers


def _is_proj_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))


def find_self_attention(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's self-attention modules in layer order (module registration order)."""
    found = [(n, m) for n, m in encoder.named_modules()
             if isinstance(m, nn.MultiheadAttention) or _is_proj_attention(m)]
    if not found:
        raise ValueError(f"no self-attention layer found in {type(encoder).__name__}: CatVersion reaches "
                         "torch.nn.MultiheadAttention and modules with q_proj/k_proj/v_proj/out_proj (CLIP).")
    return found


def heads_of(m: nn.Module) -> int:
    for name in ("num_heads", "heads", "n_heads"):
        if isinstance(getattr(m, name, None), int):
            return getattr(m, name)
    raise ValueError(f"{type(m).__name__} has no head count (num_heads/heads); CatVersion cannot split its Keys.")


def hidden_of(m: nn.Module) -> int:
    return m.embed_dim if isinstance(m, nn.MultiheadAttention) else m.k_proj.out_features


def resolve_layers(count: int, layers: int | Sequence[int], output_layer: int | None = None) -> tuple[int, ...]:
    """Layer indices (0-based) from the spec. An int N is the last N layers that reach the output:
    with a penultimate-layer output (SDXL, clip skip 2) the last layer would change nothing."""
    last = count - 1 if output_layer is None else (output_layer % count)
    if isinstance(layers, int):
        if layers > last + 1:
            raise ValueError(f"layers={layers} but only {last + 1} self-attention layers reach the output "
                             f"(of {count}); ask for at most {last + 1}.")
        return tuple(range(last + 1 - layers, last + 1))
    idx = tuple(sorted({i % count if -count <= i < count else i for i in layers}))
    bad = [i for i in idx if not 0 <= i < count]
    if bad:
        raise ValueError(f"layer indices {bad} are outside the encoder's {count} self-attention layers "
                         f"(0..{count - 1}).")
    return idx


def encoder_info(encoder: nn.Module) -> dict:
    attn = find_self_attention(encoder)
    m = attn[-1][1]
    return {"hidden": hidden_of(m), "heads": heads_of(m), "layers": len(attn)}


def check_compatible(file_info: Mapping, enc_info: Mapping, where: str, encoder: str = "") -> None:
    """Refuse embeddings made for another text encoder, naming the file, the mismatch and the fix."""
    name = f" '{encoder}'" if encoder else ""
    for key, what in (("hidden", "hidden size"), ("layers", "self-attention layer count"), ("heads",
            "attention head count")):
        if int(file_info[key]) != int(enc_info[key]):
            raise ValueError(f"{where} was trained for a text encoder{name} with {what} {file_info[key]}, but this one "
                             f"has {enc_info[key]}: it belongs to another model family. Load it with the CLIP it was "
                             "trained on (the file's metadata names it), or train CatVersion again on this CLIP.")
    bad = [i for i in file_info["indices"] if not 0 <= int(i) < int(enc_info["layers"])]
    if bad:
        raise ValueError(f"{where} addresses layers {bad} of text encoder{name}, which has {enc_info['layers']}.")
