"""The attention with concatenated Keys/Values, installed on a text encoder's self-attention modules and removed."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import KVEmbeddings
from .spec import check_compatible, encoder_info, find_self_attention, heads_of


def _sdpa(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None, dropout: float = 0.0) -> Tensor:
    """(B, L, E) q and (B, S, E) k, v -> (B, L, E); mask additive float or bool (True = attend), broadcastable to (B,
    h, L, S)."""
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


def _pad_additive(mask: Tensor | None, n: int, bias: float = 0.0, rows: int = 0, dtype=None,
                  device=None) -> Tensor | None:
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


def prefixed_forward(module: nn.Module, pk: Tensor, pv: Tensor, switch: Switch | None = None,
                     bias: float = 0.0) -> Callable:
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
