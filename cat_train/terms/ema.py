"""An exponential moving average (EMA) of the trained adapter weights, kept in fp32 beside them.

After optimizer step s the shadow is a copy of the weights while s <= ema_start_step, then
shadow <- decay * shadow + (1 - decay) * weights. What a run writes (its result, each save_every file) is the shadow;
training itself never sees it, so the optimizer's path is the same as without it. A `plugs.RunHook`: its
state goes into checkpoints under "ema" (a resume continues the same average), its settings into the LoRA header.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..step.plugs import Adapter, RunHook


@dataclass(frozen=True)
class EmaSettings:
    """`TrainConfig.ema_decay` and `ema_start_step` as the terms registry sees them (TrainConfig.ema)."""
    decay: float = 0.0
    start_step: int = 0

    @property
    def active(self) -> bool:
        return bool(self.decay)

    def metadata(self, history: Sequence[dict] = ()) -> dict[str, str]:
        return {"cat_ema_decay": str(float(self.decay)), "cat_ema_start_step": str(int(self.start_step))}

    def build(self, denoiser, adapter: Adapter) -> "WeightEma":
        return WeightEma(adapter, self.decay, self.start_step)


class WeightEma(RunHook):
    name = "ema"

    def __init__(self, adapter: Adapter, decay: float, start_step: int = 0):
        self.params = adapter.parameters()
        self.decay, self.start_step = float(decay), int(start_step)
        # fp32 whatever the weights' dtype: a bf16 shadow would stop moving once (1 - decay) * change < its spacing
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def end_of_step(self, step: int) -> None:
        for s, p in zip(self.shadow, self.params):
            if step <= self.start_step:
                s.copy_(p)
            else:
                s.lerp_(p.detach().float(), 1.0 - self.decay)  # s + (1 - d)(p - s) = d s + (1 - d) p

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """The shadow in the adapter's parameters for the duration, then the trained weights back (bit for bit)."""
        trained = [p.detach().clone() for p in self.params]
        self._put(self.shadow)
        try:
            yield
        finally:
            self._put(trained)

    def close(self) -> None:
        # the run is over: the adapter keeps the average, which is what the run returns (and keep_adapter leaves)
        self._put(self.shadow)

    @torch.no_grad()
    def _put(self, values: Sequence[torch.Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": [s.detach().cpu().clone() for s in self.shadow], "decay": self.decay,
                "start_step": self.start_step}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("shadow", [])
        if len(saved) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(saved, self.shadow)):
            raise ValueError(f"the checkpoint's EMA holds {len(saved)} tensors, this adapter has {len(self.shadow)}: "
                             "resume with the same adapter settings, or start afresh without resume_from.")
        for s, v in zip(self.shadow, saved):
            s.copy_(v)
