"""Measuring a run: validation without sampling, previews, sampling, the paper's metrics, the best step, the leak
scan, and charts.

    validation.py  fit and keep drift at fixed (noise, timestep) points, no sampling
    preview.py     preview images with the current adapter, the same noise every round
    sampling.py    deterministic DDIM / flow sampling with classifier-free guidance over any Denoiser
    metrics.py     PS, IS and KPS over CLIP embeddings
    best_step.py   which saved step to keep
    leak.py        the leak scan's ranking, report and chart
    plot.py        loss curves and bar charts with PIL alone
    observe.py     looking at the model from inside training without changing what training does next

May import step, adapters (switching LoRA on and off) and data (prompts).
"""
