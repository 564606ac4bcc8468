"""CatVersion (Zhao et al., arXiv 2311.14631): a concept as learnable Keys/Values concatenated in the text encoder.

In chosen self-attention layers of the text encoder, `length` learnable vectors are concatenated to the
projected Keys and Values (before the head split, visible to every token whatever the causal mask):

    Attn(Q, [P_K; K], [P_V; V])

so a prompt's features get a residual towards the concept, while the UNet and every weight of the text
encoder stay frozen. Defaults follow the authors' released adapters (adapter-transformers "flat" prefix
tuning on SD1.5's CLIP ViT-L/14 text model): the last 3 of its 12 self-attention layers (9, 10, 11), one
embedding per layer, initialised N(0, 1), AdamW at lr 1e-2 (their 5e-3 base rate scaled by batch 2),
batch 2, 1000 steps, the ordinary diffusion loss. As their code trains (read in RoyZhao926/CatVersion, not
copied): the caption is the class word, no placeholder (`CatVersionConfig.caption="class"`: the trigger replaced
by the class word), images flipped horizontally with p 0.5 (`flip`), and the sampler's unconditional prompt
encoded without the embeddings (the hosts: the world bench and Apply CatVersion keep them off it). Their code also
adds +1 to the prefix column's attention logit (it concatenates ones to an additive mask); that is
`CatVersionSpec.prefix_bias=1`, off by default (0: the prefix takes part with logit q.k / sqrt(d) like any key).
This pack's earlier choices are options: captions with the trigger (`caption="trigger"`), no flips (`flip=0`).

Attention modules reached: `torch.nn.MultiheadAttention` (self-attention, packed in_proj; the world's
encoder) and modules with `q_proj`/`k_proj`/`v_proj`/`out_proj` called as `(x, mask, optimized_attention)`
(ComfyUI's `comfy.clip_model.CLIPAttention`). The adapter is installed as an instance `forward` on those
modules and removed again, leaving the encoder exactly as found; `prefixed_forward` gives hosts the same
function to install their own way (ComfyUI: as object patches on a clone).

The CAT term composes: with α > 0 the frozen pass is the UNet on y encoded *without* the embeddings,
the adapted pass on y encoded with them (the UNet itself is never adapted).

Training runs in the one loop (`train.train`) through `CatVersionAdapter`, an adapter that lives in the text
encoder: checkpoints, exact resume, cancel, accumulation, mixed precision and progress reports as for LoRA.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...step.denoiser import Cond, Denoiser, FlowSchedule, NoiseSchedule
from ...step.objective import CatLossConfig, cat_cond
from ...step.plugs import Adapter, StepTerm
from ...data.prompts import PreservationMode, preservation_prompt
from ...training.loop import BatchSampler, Example, StepInfo, TrainConfig, train

FORMAT = "cat_train.catversion/1"
PAPER_LAYERS = 3  # last 3 of CLIP ViT-L/14's 12 layers in the released adapters


@dataclass
class CatVersionSpec:
    layers: int | tuple[int, ...] = field(default=PAPER_LAYERS, metadata={"help": (
        "int N: the last N self-attention layers that feed the output (the paper: 3); a tuple: explicit layer indices.")})
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
    found = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.MultiheadAttention) or _is_proj_attention(m)]
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
        raise ValueError(f"layer indices {bad} are outside the encoder's {count} self-attention layers (0..{count - 1}).")
    return idx


# ---------------------------------------------------------------- the embeddings


class KVEmbeddings(nn.Module):
    """Keys and Values concatenated per layer, in the projected space: keys/values (n_layers, length, hidden)."""

    def __init__(self, layers: Sequence[int], length: int, hidden: int, heads: int, total_layers: int,
                 prefix_bias: float = 0.0):
        super().__init__()
        self.prefix_bias = float(prefix_bias)
        self.layer_indices = tuple(int(i) for i in layers)
        self.hidden, self.heads, self.total_layers, self.length = hidden, heads, total_layers, length
        self.keys = nn.Parameter(torch.zeros(len(self.layer_indices), length, hidden))
        self.values = nn.Parameter(torch.zeros(len(self.layer_indices), length, hidden))

    def initialise(self, spec: CatVersionSpec, generator: torch.Generator | None = None) -> "KVEmbeddings":
        with torch.no_grad():
            if spec.init == "normal":
                for p in (self.keys, self.values):
                    p.copy_(torch.randn(p.shape, generator=generator) * spec.init_std)
            else:
                self.keys.zero_()
                self.values.zero_()
        return self

    def info(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "layers": self.total_layers,
                "indices": list(self.layer_indices), "length": self.length, "prefix_bias": self.prefix_bias}


def new_embeddings(encoder: nn.Module, spec: CatVersionSpec, output_layer: int | None = None,
                   generator: torch.Generator | None = None) -> KVEmbeddings:
    attn = find_self_attention(encoder)
    idx = resolve_layers(len(attn), spec.layers, output_layer)
    m = attn[idx[0]][1]
    return KVEmbeddings(idx, spec.length, hidden_of(m), heads_of(m), len(attn), spec.prefix_bias).initialise(spec, generator)


# ---------------------------------------------------------------- the attention with concatenated K/V


def _sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None, dropout: float = 0.0) -> Tensor:
    """(B, L, E) q and (B, S, E) k, v -> (B, L, E); mask additive float or bool (True = attend), broadcastable to (B, h, L, S)."""
    b, lq, e = q.shape
    d = e // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(b, lq, e)


def _prefix(pk: Tensor, pv: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    b = k.shape[0]
    pk = pk.to(device=k.device, dtype=k.dtype).unsqueeze(0).expand(b, -1, -1)
    pv = pv.to(device=v.device, dtype=v.dtype).unsqueeze(0).expand(b, -1, -1)
    return torch.cat([pk, k], 1), torch.cat([pv, v], 1)


def _pad_additive(mask: Tensor | None, n: int, bias: float = 0.0, rows: int = 0, dtype=None, device=None) -> Tensor | None:
    """The prefix columns are visible to every query: `bias` (0 or the authors' +1) in an additive mask; without a
    mask and with a bias, a (rows, n + rows) one that only biases the prefix."""
    if mask is None:
        if not bias:
            return None
        mask = torch.zeros(rows, rows, dtype=dtype, device=device)
    return F.pad(mask, (n, 0), value=bias)


class Switch:
    """Shared on/off flag of one installed adapter (off: the module's own forward, bit for bit)."""

    def __init__(self):
        self.on = True


def prefixed_forward(module: nn.Module, pk: Tensor, pv: Tensor, switch: Switch | None = None, bias: float = 0.0) -> Callable:
    """A replacement `forward` for `module` that concatenates pk/pv (length, hidden) to its Keys/Values; `bias` is
    added to the prefix columns' logits."""
    original = type(module).forward.__get__(module)
    switch = switch or Switch()
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim:
            raise ValueError("CatVersion supports nn.MultiheadAttention without add_bias_kv/add_zero_attn and with "
                             "equal q/k/v sizes (a self-attention layer).")

        def forward(query, key=None, value=None, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if not switch.on:
                return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
            x = query if module.batch_first else query.transpose(0, 1)
            b, n = x.shape[0], x.shape[1]
            q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1)
            k, v = _prefix(pk, pv, k, v)
            p = pk.shape[0]
            mask = None
            if attn_mask is None and is_causal:
                attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            if attn_mask is not None:  # torch's convention: bool True = may NOT attend, float = additive
                am = attn_mask.to(q.dtype).masked_fill(attn_mask, float("-inf")).masked_fill(~attn_mask, 0.0) \
                    if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
                am = _pad_additive(am, p, bias)
                mask = am.view(b, module.num_heads, n, n + p) if am.ndim == 3 else am
            elif bias:
                mask = _pad_additive(None, p, bias, n, q.dtype, q.device)
            if key_padding_mask is not None:
                kp = key_padding_mask.to(q.dtype).masked_fill(key_padding_mask, float("-inf")) \
                    if key_padding_mask.dtype == torch.bool else key_padding_mask.to(q.dtype)
                kp = _pad_additive(kp, p).view(b, 1, 1, n + p)  # the bias is in `mask` already
                mask = kp if mask is None else mask + kp
            out = _sdpa(q, k, v, module.num_heads, mask, module.dropout if module.training else 0.0)
            out = module.out_proj(out)
            return (out if module.batch_first else out.transpose(0, 1)), None
        return forward

    heads = heads_of(module)

    def forward(x, mask=None, optimized_attention=None, *args, **kwargs):
        if not switch.on:
            return original(x, mask, optimized_attention, *args, **kwargs)
        q, k, v = module.q_proj(x), module.k_proj(x), module.v_proj(x)
        k, v = _prefix(pk, pv, k, v)
        if mask is not None and mask.dtype == torch.bool:
            if bias:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
                mask = _pad_additive(mask, pk.shape[0], bias)
            else:
                mask = F.pad(mask, (pk.shape[0], 0), value=True)
        else:
            mask = _pad_additive(mask, pk.shape[0], bias, x.shape[1], q.dtype, q.device)
        if optimized_attention is None or torch.is_grad_enabled():
            out = _sdpa(q, k, v, heads, mask)  # training: PyTorch SDPA has a backward whatever backend the host picked
        else:
            out = optimized_attention(q, k, v, heads, mask)
        return module.out_proj(out)
    return forward


@contextlib.contextmanager
def installed(encoder: nn.Module, emb: KVEmbeddings) -> Iterator[Switch]:
    """The encoder encodes with the embeddings inside the block; on exit every module is as found."""
    attn = find_self_attention(encoder)
    check_compatible(emb.info(), encoder_info(encoder), "the embeddings")
    switch, done = Switch(), []
    try:
        for j, i in enumerate(emb.layer_indices):
            m = attn[i][1]
            done.append((m, m.__dict__.get("forward", None)))
            m.forward = prefixed_forward(m, emb.keys[j], emb.values[j], switch, getattr(emb, "prefix_bias", 0.0))
            if isinstance(m, nn.MultiheadAttention):  # a hook makes TransformerEncoderLayer skip its fused fast path
                done[-1] += (m.register_forward_pre_hook(lambda *a: None),)
        yield switch
    finally:
        for m, prev, *hook in reversed(done):
            if prev is None:
                del m.forward
            else:
                m.forward = prev
            for h in hook:
                h.remove()


@contextlib.contextmanager
def disabled(switch: Switch) -> Iterator[None]:
    prev, switch.on = switch.on, False
    try:
        yield
    finally:
        switch.on = prev


# ---------------------------------------------------------------- files


def encoder_info(encoder: nn.Module) -> dict:
    attn = find_self_attention(encoder)
    m = attn[-1][1]
    return {"hidden": hidden_of(m), "heads": heads_of(m), "layers": len(attn)}


def check_compatible(file_info: Mapping, enc_info: Mapping, where: str, encoder: str = "") -> None:
    """Refuse embeddings made for another text encoder, naming the file, the mismatch and the fix."""
    name = f" '{encoder}'" if encoder else ""
    for key, what in (("hidden", "hidden size"), ("layers", "self-attention layer count"), ("heads", "attention head count")):
        if int(file_info[key]) != int(enc_info[key]):
            raise ValueError(f"{where} was trained for a text encoder{name} with {what} {file_info[key]}, but this one has "
                             f"{enc_info[key]}: it belongs to another model family. Load it with the CLIP it was trained on "
                             "(the file's metadata names it), or train CatVersion again on this CLIP.")
    bad = [i for i in file_info["indices"] if not 0 <= int(i) < int(enc_info["layers"])]
    if bad:
        raise ValueError(f"{where} addresses layers {bad} of text encoder{name}, which has {enc_info['layers']}.")


def save_catversion(path: str | Path, embeddings: Mapping[str, KVEmbeddings], metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors: `<encoder>.<layer>.key` / `.value` (length, hidden) fp32, header metadata with the shapes."""
    from ..export import save_lora

    tensors, info = {}, {}
    for enc, emb in embeddings.items():
        for j, i in enumerate(emb.layer_indices):
            tensors[f"{enc}.{i}.key"] = emb.keys[j].detach().float().cpu().contiguous().clone()
            tensors[f"{enc}.{i}.value"] = emb.values[j].detach().float().cpu().contiguous().clone()
        info[enc] = emb.info()
    meta = {"catversion_format": FORMAT, "catversion_encoders": json.dumps(info),
            "catversion_paper": "CatVersion, Zhao et al., arXiv 2311.14631", **dict(metadata or {})}
    return save_lora(path, tensors, {k: str(v) for k, v in meta.items()})


def load_catversion(path: str | Path, expect: Mapping[str, Mapping] | None = None) -> tuple[dict[str, KVEmbeddings], dict[str, str]]:
    """Embeddings per encoder name and the header metadata; a file that is not CatVersion's is refused by name.

    expect: {encoder name: encoder_info(...)} of the text encoders it will be applied to; a file made for
    another encoder (hidden size, layer count, heads, missing encoder) is refused naming the file."""
    from ..export import load_lora

    path = Path(path)
    tensors, meta = load_lora(path)
    if meta.get("catversion_format") != FORMAT:
        raise ValueError(f"{path} is not a CatVersion file (no catversion_format={FORMAT} in its metadata); "
                         "LoRAs go through LoraLoader, CatVersion embeddings through Apply CatVersion.")
    out = {}
    for enc, info in json.loads(meta["catversion_encoders"]).items():
        emb = KVEmbeddings(info["indices"], int(info["length"]), int(info["hidden"]), int(info["heads"]), int(info["layers"]),
                           float(info.get("prefix_bias", 0.0)))  # files from before the option: an ordinary key
        with torch.no_grad():
            for j, i in enumerate(emb.layer_indices):
                for kind, p in (("key", emb.keys), ("value", emb.values)):
                    t = tensors.get(f"{enc}.{i}.{kind}")
                    if t is None or tuple(t.shape) != tuple(p.shape[1:]):
                        raise ValueError(f"{path}: tensor {enc}.{i}.{kind} is "
                                         f"{'missing' if t is None else tuple(t.shape)}, expected {tuple(p.shape[1:])}; "
                                         "the file is damaged or was edited, train it again.")
                    p[j].copy_(t.float())
        out[enc] = emb.requires_grad_(False)
    if expect is not None:
        missing = sorted(set(out) - set(expect))
        if missing or not out:
            raise ValueError(f"{path} holds embeddings for text encoder(s) {sorted(out)}, but this CLIP has {sorted(expect)}: "
                             "it was trained on another model family; use it with that CLIP or train again on this one.")
        for enc, emb in out.items():
            check_compatible(emb.info(), expect[enc], str(path), enc)
    return out, meta


# ---------------------------------------------------------------- training


@dataclass
class CatVersionConfig:
    steps: int = field(default=1000, metadata={"help": "optimizer steps (the released adapters: 1000, adapter_gs-999)."})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (the paper: 1e-2 = 5e-3 base rate x batch 2, LDM's scale_lr)."})
    batch_size: int = field(default=2, metadata={"help": "images per step (the paper: 2)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (torch's default, as the reference)."})
    alpha: float = field(default=0.0, metadata={"help": (
        "CAT factor: 0 = CatVersion as published; > 0 adds the CAT term, which keeps the preservation prompt's "
        "conditioning (UNet on y encoded without the embeddings vs with them).")})
    preservation: PreservationMode = field(default="class", metadata={"help": (
        "for alpha > 0, how y is made from the caption: `class`, `strip` or `empty` (as CatLossConfig).")})
    class_word: str | dict[str, str] = field(default="", metadata={"help": (
        "for alpha > 0 and `class`: y = the caption with the trigger replaced by this word (the node: the dataset's "
        "class word when empty).")})
    seed: int = field(default=0, metadata={"help": "seeds init, batches, timesteps and noise: same seed, same embeddings (bit for bit on CPU)."})
    caption: Literal["class", "trigger"] = field(default="class", metadata={"help": (
        "training caption. `class`: the trigger replaced by the class word, no placeholder (the authors' code trains on "
        "the class word alone; a caption that is just the trigger becomes exactly that); `trigger`: the caption as "
        "given (this pack's earlier choice).")})
    flip: float = field(default=0.5, metadata={"help": (
        "probability of a horizontal flip of each training image (the authors' code: 0.5; earlier: 0).")})

    def __post_init__(self):
        for ok, msg in [(self.steps >= 1, f"steps must be >= 1, got {self.steps} (the paper: 1000)."),
                        (self.lr > 0, f"lr must be > 0, got {self.lr} (the paper: 1e-2)."),
                        (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
                        (self.alpha >= 0, f"CAT factor alpha must be >= 0 (0 = plain CatVersion), got {self.alpha}."),
                        (self.caption in ("class", "trigger"), f"caption must be 'class' or 'trigger', got {self.caption!r}."),
                        (0 <= self.flip <= 1, f"flip (a probability) must be in [0, 1], got {self.flip}.")]:
            if not ok:
                raise ValueError(msg)


@dataclass
class CatVersionResult:
    embeddings: dict[str, KVEmbeddings]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps_done: int = 0
    last_checkpoint: Path | None = None


Encode = Callable[[list[str]], Cond]


class CatVersionAdapter(Adapter):
    """The embeddings of each text encoder as the loop's adapter. They act before the UNet, so the loop has every
    batch's prompts encoded through them (`conditionings`); the frozen model's conditionings are the same prompts
    encoded with the embeddings switched off, once per prompt. A checkpoint holds "catversion" and "spec"."""

    name = "catversion"
    encodes_prompts = True
    size_hint = "the CatVersion layers or embeddings per layer"

    def __init__(self, encoders: Mapping[str, nn.Module], encode: "Encode", spec: CatVersionSpec,
                 output_layers: Mapping[str, int | None] | None = None,
                 finish: Callable[[Cond, Tensor], Cond] | None = None):
        self.encoders, self.encode, self.spec = dict(encoders), encode, spec
        self.output_layers = dict(output_layers or {})
        self.finish = finish or (lambda c, x0: c)
        self.embeddings: dict[str, KVEmbeddings] = {}
        self._stack = contextlib.ExitStack()
        self._switches: list[Switch] = []
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._frozen: dict[str, Cond] = {}

    def install(self, denoiser: Denoiser, gen: torch.Generator) -> None:
        dev = next(denoiser.module.parameters()).device
        self.embeddings = {n: new_embeddings(enc, self.spec, self.output_layers.get(n), gen) for n, enc in self.encoders.items()}
        for e in self.embeddings.values():
            e.to(dev).requires_grad_(True)
        # the UNet and the encoders are frozen; their flags are put back on remove()
        self._flags = [(p, p.requires_grad) for m in (denoiser.module, *self.encoders.values()) for p in m.parameters()]
        for m in (denoiser.module, *self.encoders.values()):
            m.requires_grad_(False)
        try:
            self._switches = [self._stack.enter_context(installed(self.encoders[n], e)) for n, e in self.embeddings.items()]
        except BaseException:
            self.remove()
            raise

    def parameters(self) -> list[nn.Parameter]:
        return [p for e in self.embeddings.values() for p in e.parameters()]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        with contextlib.ExitStack() as off:
            for s in self._switches:
                off.enter_context(disabled(s))
            yield

    def conditionings(self, prompts, x0: Tensor, with_pres: bool):
        caps, ys = [p[0] for p in prompts], [p[1] for p in prompts]
        adapted = (self._cond([self.encode([c]) for c in caps], x0),
                   self._cond([self.encode([y]) for y in ys], x0) if with_pres else None)
        with torch.no_grad():
            frozen = (self._cond([self._frozen_cond(c) for c in caps], x0),
                      self._cond([self._frozen_cond(y) for y in ys], x0) if with_pres else None)
        return adapted, frozen

    def _cond(self, rows: list[Cond], x0: Tensor) -> Cond:
        return {k: v.to(x0.device) for k, v in self.finish(cat_cond(*rows), x0).items()}

    def _frozen_cond(self, prompt: str) -> Cond:
        if prompt not in self._frozen:
            with torch.no_grad(), self.disabled():
                self._frozen[prompt] = {k: v.detach() for k, v in self.encode([prompt]).items()}
        return self._frozen[prompt]

    def state_dict(self) -> dict:
        return {"catversion": {n: {"keys": e.keys.detach().cpu().clone(), "values": e.values.detach().cpu().clone(),
                                   "info": e.info()} for n, e in self.embeddings.items()},
                "spec": {**asdict(self.spec), "layers": self.spec.layers if isinstance(self.spec.layers, int) else list(self.spec.layers)}}

    def load_state_dict(self, state: dict, where: str) -> None:
        if "catversion" not in state:
            raise ValueError(f"checkpoint {where} holds no CatVersion embeddings (a LoRA run's?); resume CatVersion from "
                             "a checkpoint the CatVersion trainer wrote, or start afresh without one.")
        saved = CatVersionSpec(**state["spec"])
        if saved != self.spec or set(state["catversion"]) != set(self.embeddings):
            raise ValueError(f"checkpoint {where} was trained with {saved} on encoders {sorted(state['catversion'])}, not "
                             f"{self.spec} on {sorted(self.embeddings)}; resume with the same CatVersion settings and CLIP.")
        with torch.no_grad():
            for n, e in self.embeddings.items():
                check_compatible(state["catversion"][n]["info"], e.info(), f"checkpoint {where}", n)
                e.keys.copy_(state["catversion"][n]["keys"])
                e.values.copy_(state["catversion"][n]["values"])

    def weights(self) -> dict[str, KVEmbeddings]:
        return dict(self.embeddings)

    def remove(self) -> None:
        self._stack.close()
        self._switches = []
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for e in self.embeddings.values():
            e.requires_grad_(False)


class ReferenceSampler(BatchSampler):
    """The CatVersion trainer's own draw, kept so a seed gives the embeddings it always gave: images uniformly
    (repeats come as repeated items), with aspect buckets a bucket by its image count first; noise before t."""

    def __init__(self, examples: Sequence[Example], batch_size: int):
        self.examples, self.batch_size = examples, batch_size
        shapes = sorted({tuple(e.latent.shape) for e in examples})
        self.groups = [[i for i, e in enumerate(examples) if tuple(e.latent.shape) == sh] for sh in shapes]
        self.sizes = torch.tensor([float(len(gr)) for gr in self.groups])

    def draw(self, gen: torch.Generator) -> list[int]:
        if len(self.groups) == 1:
            return torch.randint(0, len(self.examples), (self.batch_size,), generator=gen).tolist()
        grp = self.groups[int(torch.multinomial(self.sizes, 1, generator=gen))]
        return [grp[j] for j in torch.randint(0, len(grp), (self.batch_size,), generator=gen).tolist()]

    def draw_batch(self, gen: torch.Generator, schedule: NoiseSchedule | FlowSchedule) -> tuple[list[int], Tensor, Tensor]:
        idx = self.draw(gen)
        noise = torch.randn((len(idx), *self.examples[idx[0]].latent.shape), generator=gen)
        return idx, schedule.sample_t(len(idx), gen), noise


class Flip(StepTerm):
    """Horizontal flips of the training images with probability p (CatVersion's data pipeline). One draw per sample
    every batch from the run's generator, flipped or not, so resumes stay exact. In an image space when the denoiser
    names one (`augment_space`, as APT's augmentation), otherwise on the latent (SD's VAE: close to the image's flip)."""

    name = "flip"

    def __init__(self, denoiser: Denoiser, p: float):
        self.p, self.space = p, getattr(denoiser, "augment_space", None)

    def augment(self, x0: Tensor, t: Tensor, gen: torch.Generator) -> Tensor:
        flip = (torch.rand(x0.shape[0], generator=gen) < self.p).to(x0.device)
        if not bool(flip.any()):
            return x0
        img = self.space[0](x0) if self.space else x0
        out = self.space[1](img.flip(-1)) if self.space else img.flip(-1)
        return torch.where(flip[:, None, None, None], out, x0)


def training_caption(caption: str, triggers: Sequence[str], cfg: "CatVersionConfig") -> str:
    """The caption CatVersion trains on: with `caption="class"` the trigger replaced by the class word."""
    if cfg.caption == "trigger" or not triggers:
        return caption
    if not cfg.class_word:
        raise ValueError("CatVersion caption='class' trains on the class word instead of the trigger, but no class word "
                         "is set: give class_word (the node: the dataset's class word, or its class_word widget), or "
                         "set caption='trigger'.")
    return preservation_prompt(caption, tuple(triggers), "class", cfg.class_word)


def train_catversion(denoiser: Denoiser, encoders: Mapping[str, nn.Module], encode: Encode,
                     items: Sequence[tuple[Tensor, str, Sequence[str]]], spec: CatVersionSpec, cfg: CatVersionConfig,
                     output_layers: Mapping[str, int | None] | None = None,
                     callback: Callable[[StepInfo], None] | None = None,
                     finish: Callable[[Cond, Tensor], Cond] | None = None, resume: str | Path | None = None,
                     **loop) -> CatVersionResult:
    """Train the embeddings of each encoder (SDXL: two) on (latent, caption y_T, triggers) items.

    `encode(prompts)` must run the text encoders as installed (it is called inside the install) and return
    the UNet's cond, differentiably; the UNet and the encoders are frozen, only the embeddings learn.
    `finish(cond, x0)` turns the encoder's batched output into the UNet's cond for those latents (SDXL: pooled
    output + size conditioning); None: `encode` returns it ready. `loop`: further `TrainConfig` settings
    (grad_accum, mixed_precision, save_every, checkpoint_dir, max_grad_norm, gradient_checkpointing); `resume`: a
    checkpoint of such a run. Same seed, same embeddings (bit for bit on CPU)."""
    ys = [preservation_prompt(cap, tuple(trig), cfg.preservation, cfg.class_word) if cfg.alpha > 0 else ""
          for _, cap, trig in items]
    examples = [Example(lat, {}, {}, prompts=(training_caption(cap, trig, cfg), y)) for (lat, cap, trig), y in zip(items, ys)]
    loss_cfg = CatLossConfig(alpha=cfg.alpha, preservation=cfg.preservation, class_word=cfg.class_word)
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                       seed=cfg.seed, **loop)
    adapter = CatVersionAdapter(encoders, encode, spec, output_layers, finish)
    t0 = time.perf_counter()
    r = train(denoiser, examples, loss_cfg, adapter, tcfg, callback=callback, resume=resume,
              sampler=ReferenceSampler(examples, cfg.batch_size), extra_terms=[Flip(denoiser, cfg.flip)] if cfg.flip else [])
    return CatVersionResult(r.weights, r.history, time.perf_counter() - t0, r.steps_done, r.last_checkpoint)


def training_metadata(spec: CatVersionSpec, cfg: CatVersionConfig, triggers: Sequence[str] = (), base: str = "",
                      images: int = 0, steps_done: int | None = None) -> dict[str, str]:
    return {"catversion_spec": json.dumps({**asdict(spec), "layers": spec.layers if isinstance(spec.layers, int) else list(spec.layers)}),
            "catversion_train": json.dumps({**asdict(cfg), "class_word": cfg.class_word}),
            "catversion_triggers": json.dumps(list(triggers)), "catversion_base": base,
            "catversion_images": str(images), "catversion_steps": str(cfg.steps if steps_done is None else steps_done),
            "cat_factor": str(float(cfg.alpha))}


def param_count(embs: Mapping[str, KVEmbeddings]) -> int:
    return sum(p.numel() for e in embs.values() for p in e.parameters())


__all__ = ["CatVersionSpec", "CatVersionConfig", "CatVersionResult", "KVEmbeddings", "find_self_attention",
           "resolve_layers", "new_embeddings", "prefixed_forward", "installed", "disabled", "encoder_info",
           "check_compatible", "save_catversion", "load_catversion", "train_catversion", "training_metadata",
           "Switch", "param_count"]
