"""CAT Leak Scan inside a real ComfyUI: the tiny SD1.x model sampled through ComfyUI's own sampler and VAE,
scored by a tiny open_clip model. Same model twice -> every drift exactly 0; a LoRA patch -> drift > 0, ranked."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import progress_hook

PROBES = "a photo of a dog\na photo of a cat\na red car\na bowl of fruit"
SMALL = dict(negative="", seed=3, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=64,
             images_per_probe=2, top_k=2, open_clip_model="CATTinyCLIP")


def _scan(comfy, base, adapted, clip, vae, clip_ckpt, **kw):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_LeakScan"]
    args = {**SMALL, "probes": PROBES, "clip_checkpoint": clip_ckpt, **kw}
    return node.execute(base_model=base, adapted_model=adapted, clip=clip, vae=vae, **args).result


def _rows(report: str) -> list[tuple[float, str]]:
    """(drift, probe) of each ranked row of the report."""
    row = re.compile(r"^\s*\d+\s+(-?\d+\.\d{4})\s+\S+\s+\S+\s+(.+)$", re.M)
    return [(float(m.group(1)), m.group(2)) for m in row.finditer(report)]


def _lora_sd(mp, scale=1.0, rank=4, seed=0) -> dict:
    """A random LoRA on every cross-attention key/value, in keys ComfyUI's LoRA loader reads."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in mp.model.diffusion_model.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            out_f, in_f = module.weight.shape
            sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale
            sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank))
    assert len(sd) >= 6
    return sd


def _with_lora(mp, scale=1.0):
    """A clone of MODEL carrying that LoRA, applied as LoraLoader does."""
    import comfy.sd

    sd = _lora_sd(mp, scale)
    patched, _ = comfy.sd.load_lora_for_models(mp, None, sd, 1.0, 0)
    assert len(patched.patches) == len(sd) // 3  # every LoRA pair found its weight
    return patched

def test_same_model_drifts_exactly_zero(comfy, tiny_sd15, tiny_open_clip):
    mp, clip, vae = tiny_sd15
    calls = []
    with progress_hook(lambda value, total, preview, node_id=None: calls.append((value, total))):
        report, worst, chart, grid = _scan(comfy, mp, mp, clip, vae, tiny_open_clip)
    rows = _rows(report)
    assert sorted(p for _, p in rows) == sorted(PROBES.splitlines())
    assert all(d == 0.0 for d, _ in rows)  # same seeds, same model: identical images, similarity exactly 1
    assert worst == "" and "No probe drifted" in report
    assert calls == [(i, 8) for i in range(1, 9)]  # one tick per probe and model: 4 probes x (base, adapted)
    assert grid.shape == (1, 22 + 4 * (22 + 64), 2 * 2 * 64 + 8, 3)
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.shape[1] == 44 + 24 * 4 + 10
    left, right = grid[0, 44:108, :128], grid[0, 44:108, 136:]
    assert torch.equal(left, right) and left.std() > 0.01  # real, identical base and adapted images


def test_lora_patch_drifts_ranked_worst_first(comfy, tiny_sd15, tiny_open_clip):
    mp, clip, vae = tiny_sd15
    adapted = _with_lora(mp, scale=0.5)
    report, worst, chart, grid = _scan(comfy, mp, adapted, clip, vae, tiny_open_clip)
    rows = _rows(report)
    drifts = [d for d, _ in rows]
    assert len(rows) == 4 and min(drifts) > 0 and max(drifts) > 1e-3, report
    assert drifts == sorted(drifts, reverse=True)  # worst first
    assert worst.splitlines() == [p for _, p in rows[:2]]  # top_k = 2, pasteable one per line
    left, right = grid[0, 44:108, :128], grid[0, 44:108, 136:]
    assert (left - right).abs().max() > 0.05  # the worst probe's images really differ
    # a second scan samples the base right after the patched clone was loaded: ComfyUI must have removed the
    # LoRA from the shared UNet again, so the base images and the whole ranking come out the same
    report2, worst2, _, grid2 = _scan(comfy, mp, adapted, clip, vae, tiny_open_clip)
    assert torch.equal(grid2, grid) and report2 == report and worst2 == worst
    # drift measures how far the adapter moved the model: the same LoRA at a fifth of the scale drifts less
    weak = [d for d, _ in _rows(_scan(comfy, mp, _with_lora(mp, scale=0.1), clip, vae, tiny_open_clip)[0])]
    assert 0 < sum(weak) < 0.5 * sum(drifts), (weak, drifts)

def test_leak_scan_errors_name_the_field(comfy, tiny_sd15, tiny_open_clip):
    mp, clip, vae = tiny_sd15
    with pytest.raises(ValueError, match="probes is empty"):
        _scan(comfy, mp, mp, clip, vae, tiny_open_clip, probes="\n \n")
    with pytest.raises(ValueError, match="not in models/clip"):
        _scan(comfy, mp, mp, clip, vae, "missing.safetensors")
    with pytest.raises(ValueError, match="multiples of 8"):
        _scan(comfy, mp, mp, clip, vae, tiny_open_clip, width=68)


def test_leak_scan_in_a_graph_after_stock_lora_loader(comfy, test_checkpoint_node, tiny_sd15, tiny_open_clip):
    """Validated and run by ComfyUI's executor: base MODEL vs the same MODEL through LoraLoaderModelOnly."""
    import comfy.utils as cu

    from conftest import run_prompt

    # tiny_sd15 has the loader node's architecture: its module shapes make a LoRA file for it
    loras = comfy.folder_paths.get_folder_paths("loras")[0]
    cu.save_torch_file(_lora_sd(tiny_sd15[0], scale=0.5), f"{loras}/leak_scan_test.safetensors")
    scan = {"base_model": ["1", 0], "adapted_model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2], "probes": PROBES,
            "clip_checkpoint": tiny_open_clip, **SMALL}
    prompt = {
        "1": {"class_type": "CATTest_TinyCheckpoint", "inputs": {"kind": "sd15"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "leak_scan_test.safetensors",
                                                              "strength_model": 1.0}},
        "3": {"class_type": "CAT_LeakScan", "inputs": scan},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 3]}},
    }
    ex = run_prompt(prompt)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    report = out["3"]["text"][0]
    drifts = [d for d, _ in _rows(report)]
    assert len(drifts) == 4 and min(drifts) > 0 and drifts == sorted(drifts, reverse=True), report
    assert len(out["4"]["images"]) == 1 and len(out["5"]["images"]) == 1
