"""A Stable-Diffusion UNet built from a config, with ComfyUI's (ldm) parameter names.

Same module tree and names as `comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`
(input_blocks / middle_block / output_blocks, `transformer_blocks.N.attn1.to_q`, ...), so LoRA
targets, key mapping and export are one code path for this model and for a real SD1.5/SDXL UNet
loaded by ComfyUI. Used by tests, the demo and the benchmark; the config keys are ComfyUI's.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

SD15_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4, 4),
    transformer_depth=(1, 1, 1, 0), transformer_depth_middle=1, context_dim=768, num_heads=8,
    use_linear_in_transformer=False,
)
SDXL_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10), transformer_depth_middle=10, context_dim=2048, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=2816,
)
TINY_CONFIG: dict[str, Any] = dict(
    in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    transformer_depth=(1, 1), context_dim=64, num_heads=2, use_linear_in_transformer=False,
)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = x.shape[0], self.heads
        q, k, v = (z.view(b, -1, h, z.shape[-1] // h).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, h * out.shape[-1]))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.use_linear = use_linear
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = proj(inner, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(b, -1, hgt, wid)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


class UNet(nn.Module):
    """SD1.x / SD2 / SDXL-shaped UNet. `forward(x, timesteps, context, y=None)` like ldm."""

    def __init__(self, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2,
                 channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), context_dim=768,
                 num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
                 transformer_depth_middle=None, adm_in_channels=None, **_ignored):
        super().__init__()
        levels = len(channel_mult)
        nrb, depth = _per_level(num_res_blocks, levels), _per_level(transformer_depth, levels)
        depth_mid = max(depth) if transformer_depth_middle is None else transformer_depth_middle
        self.config = dict(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                           num_res_blocks=nrb, channel_mult=list(channel_mult), transformer_depth=depth,
                           context_dim=context_dim, num_heads=num_heads, num_head_channels=num_head_channels,
                           use_linear_in_transformer=use_linear_in_transformer,
                           transformer_depth_middle=depth_mid, adm_in_channels=adm_in_channels)
        self.model_channels = model_channels
        self.gradient_checkpointing = False
        ted = model_channels * 4

        def attn(ch: int, d: int) -> SpatialTransformer:
            heads, dim_head = ((ch // num_head_channels, num_head_channels) if num_head_channels > 0
                               else (num_heads, ch // num_heads))
            return SpatialTransformer(ch, heads, dim_head, d, context_dim, use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, ted), nn.SiLU(),
                                                         nn.Linear(ted, ted)))
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(nrb[level]):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * model_channels)]
                ch = mult * model_channels
                if depth[level] > 0:
                    layers.append(attn(ch, depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
        mid: list[nn.Module] = [ResBlock(ch, ted, ch)]
        if depth_mid > 0:
            mid.append(attn(ch, depth_mid))
        self.middle_block = TimestepEmbedSequential(*mid, ResBlock(ch, ted, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(nrb[level] + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mult * model_channels)]
                ch = mult * model_channels
                if depth[level] > 0:
                    layers.append(attn(ch, depth[level]))
                if level and i == nrb[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def _run(self, block: nn.Module, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
