"""CatVersion as the loop's adapter: embeddings that act in the text encoder, so prompts are encoded every step."""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ...step.conds import cat_cond
from ...step.denoiser import Cond, Denoiser
from ...step.plugs import Adapter
from .attention import Switch, disabled, installed
from .embeddings import KVEmbeddings, new_embeddings
from .spec import CatVersionSpec, check_compatible

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
        self.embeddings = {n: new_embeddings(enc, self.spec, self.output_layers.get(n),
                                             gen) for n, enc in self.encoders.items()}
        for e in self.embeddings.values():
            e.to(dev).requires_grad_(True)
        # the UNet and the encoders are frozen; their flags are put back on remove()
        self._flags = [(p, p.requires_grad) for m in (denoiser.module, *self.encoders.values()) for p in m.parameters()]
        for m in (denoiser.module, *self.encoders.values()):
            m.requires_grad_(False)
        try:
            self._switches = [self._stack.enter_context(installed(self.encoders[n], e))
                              for n, e in self.embeddings.items()]
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
                "spec": {**asdict(self.spec),
                         "layers": self.spec.layers if isinstance(self.spec.layers, int) else list(self.spec.layers)}}

    def load_state_dict(self, state: dict, where: str) -> None:
        if "catversion" not in state:
            raise ValueError(f"checkpoint {where} holds no CatVersion embeddings (a LoRA run's?); resume CatVersion "
                             "from a checkpoint the CatVersion trainer wrote, or start afresh without one.")
        saved = CatVersionSpec(**state["spec"])
        if saved != self.spec or set(state["catversion"]) != set(self.embeddings):
            raise ValueError(f"checkpoint {where} was trained with {saved} on encoders {sorted(state['catversion'])}, "
                             f"not {self.spec} on {sorted(self.embeddings)}; resume with the same CatVersion settings "
                             "and CLIP.")
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
