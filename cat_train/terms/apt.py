"""APT: Adaptive Personalized Training (Chae et al., CVPR 2025, arXiv 2507.02687), composable with CAT.

Three parts, each with its own weight (0 = off). Defaults follow the paper's form as far as it could be read here;
this pack's earlier choices stay options (`AptConfig.earlier()`). Sources: the arXiv abstract, the authors' project
page and figures, and two independent write-ups of the method section (the method section itself was not readable).

1. Adaptive training adjustment (`adaptive`). The timesteps are split into `bins` equal bins (10: write-ups). Per
   bin an overfitting indicator compares the pretrained and the adapted model's denoising error on the training
   images, same noisy input, L = ||target - prediction(z_t, t, y_T)||² (one value per sample):

       form "paper" (write-ups):   gamma_b = 1 - exp(-T (EMA_b[L_pre] - EMA_b[L_ft]))   T = diffusion steps (1000)
                                   each loss smoothed on its own, new-value weight 0.1, started from its first value;
                                   a negative gap reads as 0
       form "relative" (earlier):  o_b <- ema o_b + (1 - ema) (L_pre - L_ft) / L_pre, from 0

   The scales differ: an absolute gap of 0.003 gives gamma 0.95 in the paper's form; the relative form needs a 95%
   error drop for that. With excess e_b = max(0, o_b - target) and gain `adaptive` (1 = the paper's response):
   (a) the fit loss of a sample in bin b is weighted w_b = 1 - adaptive * e_b (write-ups: 1 - gamma_b; the relative
   form keeps a floor, `min_weight`); (b) the sample is augmented with probability min(adaptive * e_b, p_max)
   (write-ups; p_max = `max_augment` is unknown here, 0.8 is a choice). Augmentation (authors' figure): zoom-out
   1-3x with the subject on black, and rotation (its range unknown here; 15 degrees is a choice); earlier: zoom-out
   to 1.33x with reflection padding. Flips, shifts and colour jitter are options.
2. Representation stabilization (`stabilize`): for chosen intermediate features, the squared shift of their
   per-channel mean and standard deviation between the adapted and the frozen model on the same input (noisy
   latent, timestep, caption y_T), plain L2 (write-ups), on the self-attention modules (the authors' figure; which
   of them is unknown here: all by default). Earlier: the middle and decoder block outputs, mean and variance in
   units of the frozen variance (`stabilize_layers`, `stabilize_stat="var"`, `stabilize_normalize`): raw scales
   differ by orders of magnitude between layers (on the world model one layer's raw variance shift reached 10 while
   the fit loss was 0.2).
3. Attention alignment (`align`): the distance between the cross-attention probabilities of the adapted and the
   frozen model on the same input (MSE by default; the paper's distance is unknown here). Probabilities are built
   only for the aligned layers, from their own q and k projections (captured by hooks); the layers keep their fused
   attention. `align_skip_triggers` leaves the trigger's token columns out: the authors' prompts are class nouns,
   and aligning a rare trigger's map to a base model that never saw it pulls against learning the subject.

One frozen forward serves everything: with CAT (alpha > 0) it is one batched call over [y_T; y]; its
y_T rows give L_pre and the stabilization/alignment targets, its y rows CAT's target. The adapted
side is likewise one batched call, as in `objective.cat_objective`.

Unknown here, and therefore choices (each an `AptConfig` option): the loss weights (the bench's adaptive 1,
stabilize 5, align 1000 were set on the world model), p_max, the rotation range, the layer sets, the alignment
distance, and whether the paper's losses are per-sample means (as here) or sums.

The settings are `AptConfig` (terms/apt_config.py), which builds the term (`AptConfig.build`); every `cfg` here is
one, and this module does not import it back.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..step.plugs import BatchTerm, LossTerm, RunHook


# ---------------------------------------------------------------- (1) adaptive training adjustment
class Indicator:
    """Per-bin overfitting indicator and what it sets: fit weight and augmentation probability.

    `paper`: gamma_b = max(0, 1 - exp(-T (EMA_b[L_pre] - EMA_b[L_ft]))), T the schedule's diffusion steps, each EMA
    started from its bin's first value; a fine-tuned error above the pretrained one reads as 0, not as a negative
    indicator (which would weight the bin above 1). `relative`: EMA_b of (L_pre - L_ft) / L_pre, started from 0."""

    def __init__(self, cfg, num_timesteps: int):
        self.cfg, self.num_timesteps = cfg, num_timesteps
        self.value = torch.zeros(cfg.bins, dtype=torch.float64)
        self.count = torch.zeros(cfg.bins, dtype=torch.int64)
        self.pre = torch.zeros(cfg.bins, dtype=torch.float64)  # paper form: EMA_b[L_pre], EMA_b[L_ft]
        self.ft = torch.zeros(cfg.bins, dtype=torch.float64)

    def bin_of(self, t: Tensor) -> Tensor:
        return (t.long().cpu() * self.cfg.bins // self.num_timesteps).clamp(0, self.cfg.bins - 1)

    def excess(self, bins: Tensor) -> Tensor:
        return (self.value[bins] - self.cfg.target).clamp(min=0)

    def fit_weight(self, bins: Tensor) -> Tensor:
        if not (self.cfg.adaptive and self.cfg.adapt_weight):
            return torch.ones(len(bins), dtype=torch.float64)
        floor = self.cfg.min_weight if self.cfg.form == "relative" else 0.0
        return (1 - self.cfg.adaptive * self.excess(bins)).clamp(floor, 1.0)

    def augment_prob(self, bins: Tensor) -> Tensor:
        if not (self.cfg.adaptive and self.cfg.adapt_augment and self.cfg.augment_ops):
            return torch.zeros(len(bins), dtype=torch.float64)
        return (self.cfg.adaptive * self.excess(bins)).clamp(0.0, self.cfg.max_augment)

    def update(self, bins: Tensor, loss_pre: Tensor, loss_ft: Tensor) -> None:
        """One EMA step per sample, in batch order (deterministic, so resumes stay bit-exact)."""
        d = self.cfg.ema
        if self.cfg.form == "paper":
            for b, lp, lf in zip(bins.tolist(), loss_pre.double().cpu().tolist(), loss_ft.double().cpu().tolist()):
                first = not self.count[b]
                self.pre[b] = lp if first else d * self.pre[b] + (1 - d) * lp
                self.ft[b] = lf if first else d * self.ft[b] + (1 - d) * lf
                self.value[b] = max(0.0, 1 - math.exp(-self.num_timesteps * float(self.pre[b] - self.ft[b])))
                self.count[b] += 1
            return
        r = ((loss_pre.double() - loss_ft.double()) / loss_pre.double().clamp(min=1e-12)).cpu()
        for b, ri in zip(bins.tolist(), r.tolist()):
            self.value[b] = d * self.value[b] + (1 - d) * ri  # from 0: early single samples cannot jump it
            self.count[b] += 1

    def state_dict(self) -> dict:
        return {"value": self.value.clone(), "count": self.count.clone(), "pre": self.pre.clone(),
                "ft": self.ft.clone(),
                "form": self.cfg.form}

    def load_state_dict(self, state: dict) -> None:
        if state["value"].shape != self.value.shape:
            raise ValueError(f"checkpoint has {len(state['value'])} APT bins, this run {self.cfg.bins}; resume with "
                             "the same APT settings.")
        form = state.get("form", "relative")  # checkpoints from before the paper form held the relative indicator
        if form != self.cfg.form:
            raise ValueError(f"checkpoint's APT indicator has form {form!r}, this run {self.cfg.form!r}; resume with "
                             f"AptConfig(form={form!r}).")
        self.value.copy_(state["value"])
        self.count.copy_(state["count"])
        if "pre" in state:
            self.pre.copy_(state["pre"])
            self.ft.copy_(state["ft"])


def augment(x0: Tensor, prob: Tensor, cfg, gen: torch.Generator,
            space: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = None) -> Tensor:
    """Each sample augmented with its own probability: one random affine (zoom-out, rotation, shift, flip as
    enabled) and optional colour jitter. The same number of draws every call, applied or not, so the RNG
    stream does not depend on the indicator's values. `space` = (to_image, from_image) when the latent is
    not image-shaped (e.g. pixel-unshuffled); otherwise the transform acts on the latent itself, which for
    SD's VAE is close to the same transform of the image (it is spatially equivariant at 8 px)."""
    n = x0.shape[0]
    u = torch.rand(n, 8, generator=gen, dtype=torch.float64)
    apply = u[:, 0] < prob
    if not bool(apply.any()):
        return x0
    ops = set(cfg.augment_ops)
    if "zoom" not in ops:
        s = torch.ones(n, dtype=torch.float64)
    elif cfg.zoom_out:
        s = 1 / (1 + (cfg.zoom_out - 1) * u[:, 1])  # zoom-out factor drawn in [1, zoom_out]
    else:
        s = 1 - cfg.zoom * u[:, 1]
    a = math.radians(cfg.rotate) * (2 * u[:, 2] - 1) if "rotate" in ops else torch.zeros(n, dtype=torch.float64)
    tx, ty = ((2 * cfg.shift * (2 * u[:, 3:5] - 1)).unbind(1) if "shift" in ops else
              (torch.zeros(n, dtype=torch.float64),) * 2)
    fx = torch.where((u[:, 5] < 0.5) & torch.tensor("flip" in ops), -1.0, 1.0).double()
    # output pixel p samples input at R(a) p / s + shift: content shrinks by s (zoom-out), turns by a
    theta = torch.stack([torch.stack([fx * a.cos() / s, -a.sin() / s, tx], 1),
                         torch.stack([fx * a.sin() / s, a.cos() / s, ty], 1)], 1)
    img = space[0](x0) if space else x0
    grid = F.affine_grid(theta.to(img.device, img.dtype), list(img.shape), align_corners=False)
    if cfg.fill == "reflection":
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    else:  # black: -1 in the model's [-1, 1] image space; without an image space, 0 in the latent
        black = -1.0 if space else 0.0
        out = F.grid_sample(img - black, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + black
    if "color" in ops:
        g = (1 + cfg.color * (2 * u[:, 6] - 1)).to(img)[:, None, None, None]  # contrast about each image's mean
        b = (cfg.color * (2 * u[:, 7] - 1)).to(img)[:, None, None, None]  # brightness
        mean = out.mean((1, 2, 3), keepdim=True)
        out = (out - mean) * g + mean + b
    out = space[1](out) if space else out
    return torch.where(apply.to(x0.device)[:, None, None, None], out.to(x0.dtype), x0)


# ---------------------------------------------------------------- (2) and (3): feature and attention taps
class Taps:
    """Forward hooks that record, during a `recording(kind)` block only, per-channel feature moments of the
    stabilized layers and cross-attention probabilities of the aligned layers. Outside such blocks (e.g. the
    recompute of gradient checkpointing in backward) they do nothing."""

    def __init__(self, module: nn.Module, cfg):
        self.cfg, self.kind = cfg, None
        self.moments: dict[str, dict[str, tuple[Tensor, Tensor]]] = {"frozen": {}, "adapted": {}}
        self.probs: dict[str, dict[str, Tensor]] = {"frozen": {}, "adapted": {}}
        self._q: dict[str, Tensor] = {}
        self.handles = []
        names = dict(module.named_modules())
        if cfg.stabilize:
            self.stabilized = [n for n in names if n and re.fullmatch(cfg.stabilize_layers, n)]
            if not self.stabilized:
                raise ValueError(f"APT stabilize_layers {cfg.stabilize_layers!r} matches no module of this model.")
            for n in self.stabilized:
                mod = names[n]
                # ComfyUI's UNet runs a block's layers one by one and never calls the block itself: its output
                # is its last layer's, so that is where the hook goes (the same tensor in either UNet)
                mod = mod[-1] if isinstance(mod, nn.Sequential) and len(mod) else mod
                self.handles.append(mod.register_forward_hook(self._moment_hook(n)))
        if cfg.align:
            self.aligned = [n for n in names if n and re.fullmatch(cfg.align_layers, n)
                            and hasattr(names[n], "to_q") and hasattr(names[n], "to_k")]
            if not self.aligned:
                raise ValueError(f"APT align_layers {cfg.align_layers!r} matches no attention module (with to_q/to_k) "
                                 "of this model.")
            for n in self.aligned:
                attn = names[n]
                self.handles.append(attn.to_q.register_forward_hook(self._q_hook(n)))
                self.handles.append(attn.to_k.register_forward_hook(self._k_hook(n, attn)))

    def _moment_hook(self, name: str):
        def hook(_mod, _inp, out):
            if self.kind is None:
                return
            h = (out[0] if isinstance(out, (tuple, list)) else out).float()
            dims = tuple(range(2, h.ndim)) if h.ndim > 3 else (1,)  # (N, C, H, W) spatial; (N, L, C) tokens
            var = h.var(dims, unbiased=False)
            self.moments[self.kind][name] = (h.mean(dims),
                                             var.clamp_min(1e-12).sqrt() if self.cfg.stabilize_stat == "std" else var)
        return hook

    def _q_hook(self, name: str):
        def hook(_mod, _inp, out):
            if self.kind is not None:
                self._q[name] = out
        return hook

    def _k_hook(self, name: str, attn: nn.Module):
        def hook(_mod, _inp, k):
            if self.kind is None or name not in self._q:
                return
            q, h = self._q.pop(name), attn.heads
            b = q.shape[0]
            q = q.float().view(b, -1, h, q.shape[-1] // h).transpose(1, 2)
            k = k.float().view(b, -1, h, k.shape[-1] // h).transpose(1, 2)
            self.probs[self.kind][name] = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return hook

    @contextlib.contextmanager
    def recording(self, kind: str) -> Iterator[None]:
        self.kind = kind
        self.moments[kind].clear()
        self.probs[kind].clear()
        try:
            yield
        finally:
            self.kind = None
            self._q.clear()

    def stabilization(self, rows: int) -> Tensor:
        """Mean over layers of the squared shift of per-channel mean and std (or variance) (first `rows` samples);
        normalized: in units of the frozen channel's variance (std: of its std, so both parts stay scale-free)."""
        terms = []
        missing = [n for n in self.stabilized if n not in self.moments["adapted"] or n not in self.moments["frozen"]]
        if missing:
            raise RuntimeError(f"APT stabilize_layers {missing} were never run by this model's forward; choose other "
                               "layers.")
        for n in self.stabilized:
            (ma, va), (mf, vf) = self.moments["adapted"][n], self.moments["frozen"][n]
            ma, va, mf, vf = ma[:rows], va[:rows], mf[:rows], vf[:rows]
            if self.cfg.stabilize_normalize:
                s = vf.clamp_min(1e-6)
                if self.cfg.stabilize_stat == "std":
                    terms.append(((ma - mf) / s).pow(2).mean() + ((va - vf) / s).pow(2).mean())
                else:
                    terms.append(((ma - mf).pow(2) / s).mean() + ((va - vf) / s).pow(2).mean())
            else:
                terms.append((ma - mf).pow(2).mean() + (va - vf).pow(2).mean())
        return torch.stack(terms).mean()

    def alignment(self, rows: int, skip: list[tuple[int, ...]] | None = None) -> Tensor:
        """Distance of adapted from frozen cross-attention probabilities; `skip`: per sample, key (token) positions
        left out (align_skip_triggers)."""
        terms = []
        missing = [n for n in self.aligned if n not in self.probs["adapted"] or n not in self.probs["frozen"]]
        if missing:
            raise RuntimeError(f"APT align_layers {missing} never computed q and k in this model's forward; choose "
                               "other layers.")
        for n in self.aligned:
            pa, pf = self.probs["adapted"][n][:rows], self.probs["frozen"][n][:rows]
            keep = torch.ones(pa.shape[0], pa.shape[-1], dtype=pa.dtype, device=pa.device)
            for i, pos in enumerate((skip or [])[:rows]):
                keep[i, [p for p in pos if p < pa.shape[-1]]] = 0
            keep = keep[:, None, None, :]  # (rows, heads, queries, keys)
            if self.cfg.align_distance == "kl":
                d = pf * (pf.clamp_min(1e-12).log() - pa.clamp_min(1e-12).log())
                terms.append((d * keep).sum(-1).mean())
            elif skip:
                terms.append(((pa - pf).pow(2) * keep).sum() / (keep.sum() * pa.shape[1] * pa.shape[2]).clamp_min(1))
            else:
                terms.append((pa - pf).pow(2).mean())
        return torch.stack(terms).mean()

    def clear(self) -> None:
        for d in (*self.moments.values(), *self.probs.values()):
            d.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.clear()


# ---------------------------------------------------------------- the plug-in
class AptRun(BatchTerm, LossTerm, RunHook):
    """APT as a term of the CAT step (`loss.cat_objective`): the frozen pass also runs on y_T, whose rows give the
    pretrained error for the indicator and the targets of the penalties; the fit term is weighted per bin; after
    each evaluation the indicator moves. Keeps the indicator (checkpointed) and the hooks (removed by close())."""

    name = "apt"
    needs_frozen_token_pass = True
    history_keys = ("stabilize", "align", "indicator")

    def __init__(self, denoiser, cfg):
        self.denoiser, self.cfg = denoiser, cfg
        self.indicator = Indicator(cfg, denoiser.schedule.num_timesteps)
        self.taps = Taps(denoiser.module, cfg)  # after LoRA injection: to_q/to_k hooks see the wrapped layers
        self.space = getattr(denoiser, "augment_space", None)
        self.last: dict = {}
        self.penalties: dict[str, Tensor] = {}
        self.skip: list[tuple[int, ...]] | None = None  # the batch's trigger token positions (align_skip_triggers)

    def see_batch(self, examples) -> None:
        if self.cfg.align_skip_triggers:
            self.skip = [tuple(getattr(e, "trigger_tokens", ())) for e in examples]

    def augment(self, x0: Tensor, t: Tensor, gen: torch.Generator) -> Tensor:
        if not (self.cfg.adaptive and self.cfg.adapt_augment and self.cfg.augment_ops):
            return x0
        return augment(x0, self.indicator.augment_prob(self.indicator.bin_of(t)), self.cfg, gen, self.space)

    def fit_weight(self, t: Tensor) -> Tensor:
        return self.indicator.fit_weight(self.indicator.bin_of(t))

    def recording(self, kind: str):
        return self.taps.recording(kind)

    def penalty(self, rows: int) -> list[Tensor]:
        zero = torch.zeros(())
        rs = self.taps.stabilization(rows) if self.cfg.stabilize else zero
        aa = self.taps.alignment(rows, self.skip) if self.cfg.align else zero
        self.taps.clear()
        self.penalties = {"stabilize": rs.detach(), "align": aa.detach()}
        self.last = {k: float(v) for k, v in self.penalties.items()}
        # a part that is off adds nothing
        return [w * v for w, v in ((self.cfg.stabilize, rs), (self.cfg.align, aa)) if w]

    def after_objective(self, t: Tensor, terms) -> None:
        self.indicator.update(self.indicator.bin_of(t), terms.fit_pre, terms.fit)

    def report(self) -> dict:
        """For history and live views: the indicator per bin (None where a bin was never drawn) and the penalties."""
        ind = self.indicator
        return {"indicator": [float(v) if c else None for v, c in zip(ind.value.tolist(), ind.count.tolist())],
                "fit_weight": ind.fit_weight(torch.arange(self.cfg.bins)).tolist(),
                "augment_prob": ind.augment_prob(torch.arange(self.cfg.bins)).tolist(), **self.last}

    def state_dict(self) -> dict:
        return self.indicator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.indicator.load_state_dict(state)

    def close(self) -> None:
        self.taps.remove()
