"""The CAT Leak Scan node: sample every probe prompt with the base and the adapted MODEL from the same seeds through
ComfyUI's own sampler, decode, embed with open_clip, and rank the probes by drift (cat_train.measure.leak)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cat_train.measure import leak
from .common import CATEGORY, image_of
from .compat import search_aliases
from .evaluate import clip_checkpoints, scorer


def _encode(clip, text: str):
    """What CLIPTextEncode does, so the probes are conditioned exactly as in the user's own graphs."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _sample(model, positive, negative, vae, seed, steps, cfg, sampler_name, scheduler, width, height, batch):
    """KSampler on an empty latent, then VAEDecode: a (batch, H, W, 3) IMAGE. The noise depends only on the seed
    and the latent shape, so the base and the adapted model start from the same noise."""
    import comfy.model_management
    import comfy.sample

    latent = torch.zeros([batch, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    # disable_pbar / no callback: the node's own bar counts probes; a per-step bar would reset it every probe
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  disable_pbar=True, seed=seed)
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs: frames into the batch, as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    return images.float().cpu()


def leak_scan(base_model, adapted_model, clip, vae, probes: str, negative: str, seed: int, steps: int, cfg: float,
              sampler_name: str, scheduler: str, width: int, height: int, images_per_probe: int, top_k: int,
              checkpoint: str, arch: str):
    """-> report, worst probes (one per line), chart IMAGE, grid IMAGE."""
    import comfy.model_management
    import comfy.utils

    prompts = leak.parse_probes(probes)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8 (latents are 1/8 size), got {width}x{height}.")
    clip_scorer = scorer(checkpoint, arch)  # a wrong checkpoint fails now, not after minutes of sampling
    neg = _encode(clip, negative)
    conds = [_encode(clip, p) for p in prompts]
    bar = comfy.utils.ProgressBar(2 * len(prompts))
    images: dict[str, list[torch.Tensor]] = {"base": [], "adapted": []}
    # All base probes first, then all adapted ones: the adapted MODEL's LoRA patches are applied once, not per probe.
    for which, model in (("base", base_model), ("adapted", adapted_model)):
        for cond in conds:
            comfy.model_management.throw_exception_if_processing_interrupted()
            images[which].append(_sample(model, cond, neg, vae, seed, steps, cfg, sampler_name, scheduler,
                                         width, height, images_per_probe))
            bar.update(1)
    # Embedded separately, in the same batch layout: identical images give bit-identical embeddings, drift 0.
    base_emb = clip_scorer.embed_images(list(torch.cat(images["base"])))
    adapted_emb = clip_scorer.embed_images(list(torch.cat(images["adapted"])))
    ranked = leak.rank_probes(prompts, leak.pair_similarities(base_emb, adapted_emb, len(prompts)))
    worst = leak.worst_probes(ranked, top_k)
    return (leak.report(ranked, worst), "\n".join(worst), image_of(leak.chart(ranked, worst)),
            image_of(leak.grid(ranked, images["base"], images["adapted"])))


class LeakScanNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="CAT_LeakScan", display_name="CAT Leak Scan", category=CATEGORY, is_output_node=True,
            **search_aliases("concept leak", "concept bleeding", "lora drift"),
            description="Which prompts did the adapter change? Base vs adapted MODEL on probe prompts (same seeds), "
                        "CLIP similarity per pair, probes ranked by drift; the worst are the ones to preserve.",
            inputs=[
                io.Model.Input("base_model"),
                    io.Model.Input("adapted_model", tooltip="e.g. the trainer's MODEL output"),
                io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.String.Input("probes", default=leak.DEFAULT_PROBES, multiline=True,
                                tooltip="one prompt per line, without the trigger: the class and its neighbours"),
                io.String.Input("negative", default="", multiline=True),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="the same seeds for base and adapted"),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("images_per_probe", default=2, min=1, max=64),
                io.Int.Input("top_k", default=3, min=1, max=100, tooltip=
                        "how many drifting probes to list for preservation"),
                io.Combo.Input("clip_checkpoint", options=clip_checkpoints()),
                io.String.Input("open_clip_model", default="ViT-B-32", tooltip=
                        "open_clip architecture of the checkpoint"),
            ],
            outputs=[io.String.Output(display_name="report"), io.String.Output(display_name="worst_probes"),
                     io.Image.Output(display_name="chart"), io.Image.Output(display_name="grid")],
        )

    @classmethod
    def execute(cls, base_model, adapted_model, clip, vae, probes, negative, seed, steps, cfg, sampler_name, scheduler,
                width, height, images_per_probe, top_k, clip_checkpoint, open_clip_model) -> io.NodeOutput:
        report, worst, chart, grid = leak_scan(base_model, adapted_model, clip, vae, probes, negative, seed, steps, cfg,
                                               sampler_name, scheduler, width, height, images_per_probe, top_k,
                                               clip_checkpoint, open_clip_model)
        return io.NodeOutput(report, worst, chart, grid, ui={"text": [report]})


NODES = [LeakScanNode]
