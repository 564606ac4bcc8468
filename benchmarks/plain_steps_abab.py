"""ABAB in one process: the steps of a plain LoRA run against those of a CAT keep_every 4 run (with and without the
CAT term), the two runs alternating twice; SD1.5 UNet shape, 128 px, batch 1, rank 16.

    OMP_NUM_THREADS=1 python benchmarks/plain_steps_abab.py

step_cost.py's two ratios (against a separate LoRA process, and against the plain steps of the option's own
run) disagreed on the shared machine; runs interleaved in one process say what the plain steps inside a
keep_every run really cost.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cat_train.adapters.lora import LoraSpec  # noqa: E402
from cat_train.step.denoiser import ModuleDenoiser  # noqa: E402
from cat_train.training import CatLossConfig  # noqa: E402
from cat_train.training import Example, TrainConfig, train  # noqa: E402
from cat_train.world.unet import SD15_CONFIG, UNet  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    den = ModuleDenoiser(UNet(**SD15_CONFIG))
    cond = {"context": torch.randn(77, 768)}
    exs = [Example(torch.randn(4, 16, 16), cond, {"context": cond["context"] * 0.5}) for _ in range(4)]
    predict, frozen = den.predict, [0]

    def counted(*a):  # a forward without grad is the frozen pass: the step had the CAT term
        frozen[-1] += not torch.is_grad_enabled()
        return predict(*a)
    den.predict = counted
    runs = {"lora": CatLossConfig(alpha=0.0, preservation="empty"),
            "k4": CatLossConfig(alpha=1.0, preservation="empty", keep_every=4)}
    times: dict[str, list[float]] = {"LoRA run": [], "keep_every 4, plain steps": [], "keep_every 4, CAT steps": []}
    for rep in range(2):
        for name, lc in runs.items():
            stamps: list[float] = []
            frozen[:] = [0]

            def tick(info):
                stamps.append(time.perf_counter())
                frozen.append(0)
            train(den, exs, lc, LoraSpec(rank=16), TrainConfig(steps=9), callback=tick)
            steps = [stamps[i] - stamps[i - 1] for i in range(1, 9)]  # step 1 (warm-up, with the term) not timed
            for i, dt in enumerate(steps, 1):
                key = "LoRA run" if name == "lora" else f"keep_every 4, {'CAT' if frozen[i] else 'plain'} steps"
                times[key].append(dt)
            print(rep, name, [round(dt, 2) for dt in steps], flush=True)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: {len(v)} steps, mean {mean[k]:.3f} s")
    plain, own, cat = mean["LoRA run"], mean["keep_every 4, plain steps"], mean["keep_every 4, CAT steps"]
    print(f"CAT step / LoRA-run step: {cat / plain:.2f}x; plain step inside keep_every 4 / LoRA-run step: "
          f"{own / plain:.2f}x")
    for k in (4, 5):
        print(f"keep_every {k} cycle / LoRA-run step: {(cat + (k - 1) * own) / k / plain:.2f}x")


if __name__ == "__main__":
    main()
