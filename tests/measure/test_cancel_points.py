"""Issue 32, hangs: Cancel inside one step's long work answers within a second: a preview round (30 prompts took
18 s) and an auto-preservation measurement (150 probes took 66 s) check the host's cancel flag as they go, as the
training loop does once per step."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from cat_train.adapters.lora import LoraSpec, inject_lora
from cat_train.measure.preview import Previewer
from cat_train.step.cancel import cancel_check
from cat_train.terms.auto import AutoPreservation
from cat_train.terms.auto_config import AutoPreservationConfig
from cat_train.training import CatLossConfig, build_examples


class Cancelled(Exception):
    pass


class Slow:
    """The tiny denoiser at a real model's pace: `per_row` seconds per batch row, so a batched call costs what its
    rows cost (as on a GPU at 1024 px, where 30 prompts took 18 s a round)."""

    def __init__(self, den, per_row: float):
        self.den, self.per_row, self.rows = den, per_row, 0
        self.module, self.schedule, self.prediction_type = den.module, den.schedule, den.prediction_type

    def predict(self, x_t, t, cond):
        time.sleep(self.per_row * len(x_t))
        self.rows += len(x_t)
        return self.den.predict(x_t, t, cond)


def cancel_after(seconds: float):
    """The host's check (ComfyUI: throw_exception_if_processing_interrupted) and when Cancel was pressed."""
    pressed: list[float] = []
    timer = threading.Timer(seconds, lambda: pressed.append(time.perf_counter()))
    timer.start()

    def check():
        if pressed:
            raise Cancelled
    return check, pressed, timer


def answered_within(work, seconds_to_cancel: float) -> float:
    check, pressed, timer = cancel_after(seconds_to_cancel)
    try:
        with cancel_check(check), pytest.raises(Cancelled):
            work()
    finally:
        timer.cancel()
    assert pressed, "the work ended before Cancel was pressed: make it longer"
    return time.perf_counter() - pressed[0]


def test_cancel_during_a_preview_round_of_30_prompts_answers_within_a_second(tiny_denoiser, text):
    with torch.no_grad():  # (and peft imported: its first import took 15 s on a loaded machine)
        inject_lora(tiny_denoiser.module, LoraSpec(rank=2))
    slow = Slow(tiny_denoiser, per_row=0.005)  # a round: 30 prompts x 20 steps x 2 (guidance) rows = 6 s
    prompts = [f"a photo of sks dog number {i}" for i in range(30)]
    pv = Previewer(slow, text, prompts, ["sks"], (4, 8, 8), lambda z: (z[:, :3].permute(0, 2, 3, 1).tanh() + 1) / 2,
                   steps=20, cfg=3.0)
    waited = answered_within(lambda: pv(1), 0.3)
    assert waited < 1.0, f"Cancel answered after {waited:.2f} s"
    assert slow.rows < 30 * 20 * 2 / 2, slow.rows  # stopped in the round, not at its end


def test_cancel_during_an_auto_preservation_measurement_of_150_probes_answers_within_a_second(tiny_denoiser, text):
    probes = tuple(f"thing{i}" for i in range(150))
    lc = CatLossConfig(alpha=1.0, class_word="dog",
                       auto=AutoPreservationConfig(every=1, probes=probes, points=4, images=4))
    g = torch.Generator().manual_seed(3)
    exs = build_examples([(torch.randn(4, 8, 8, generator=g), f"a photo of sks dog {i}", ("sks",)) for i in range(4)],
                         text, lc)
    with torch.no_grad():
        inject_lora(tiny_denoiser.module, LoraSpec(rank=2))
    slow = Slow(tiny_denoiser, per_row=0.001)  # 150 probes x 4 images x 4 points, frozen and adapted: 4.8 s
    term = AutoPreservation(slow, lc.auto)
    term.start(exs)
    waited = answered_within(lambda: term.end_of_step(1), 0.3)
    assert waited < 1.0, f"Cancel answered after {waited:.2f} s"
    assert slow.rows < 150 * 4 * 4, slow.rows  # stopped before the frozen pass was done
