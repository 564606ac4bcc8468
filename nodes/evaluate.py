"""The KPS Evaluator node: image embeddings of IMAGE batches (open_clip, or ComfyUI's CLIP_VISION for IS and KPS) and
open_clip text embeddings of prompts, then PS / IS / KPS and a chart."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..cat_train.training.checks import check_image_batch
from ..cat_train.measure.metrics import ClipScorer, identity_similarity, score_images, scores_from_embeddings
from ..cat_train.measure.plot import bar_chart
from .common import CATEGORY, image_of
from .compat import search_aliases

_SCORERS: dict[tuple[str, str], ClipScorer] = {}


def scorer(checkpoint: str, arch: str) -> ClipScorer:
    """The open_clip model for a file in models/clip, loaded once per (file, architecture)."""
    import folder_paths

    path = folder_paths.get_full_path("clip", checkpoint)
    if path is None:
        raise ValueError(f"open_clip checkpoint {checkpoint!r} is not in models/clip; put e.g. an open_clip "
                         "ViT-B-32 .safetensors/.bin there and pick it, with its architecture name in open_clip_model.")
    if (path, arch) not in _SCORERS:
        _SCORERS[(path, arch)] = ClipScorer(arch, path)
    return _SCORERS[(path, arch)]


def chart(values: dict[str, float], size=(480, 260)) -> torch.Tensor:
    """PS / IS / KPS bars as a ComfyUI IMAGE (1, H, W, 3), drawn by cat_train.measure.plot (scalable font, 4
    decimals)."""
    return image_of(bar_chart(values, size, title="CAT scores (CLIP; higher is better)",
                              hints={"PS": "follows the prompt", "IS": "is the subject", "KPS": "keeps the class"}))


def apply_masks(images: torch.Tensor, masks: torch.Tensor | None, what: str) -> torch.Tensor:
    """IMAGE (B,H,W,3) with a ComfyUI MASK (B or 1, h, w) in [0, 1]: the subject kept, the rest black (CatVersion's
    masked CLIP image alignment scores the subject, not the background). Masks are resized to the images."""
    if masks is None:
        return images
    m = masks if masks.ndim == 3 else masks.reshape(-1, *masks.shape[-2:])
    if m.shape[0] not in (1, images.shape[0]):
        raise ValueError(f"{m.shape[0]} {what} masks for {images.shape[0]} images: give one mask per image, or one "
                         "for all.")
    if m.shape[-2:] != images.shape[1:3]:
        m = torch.nn.functional.interpolate(m[:, None].float(), size=images.shape[1:3], mode="bilinear",
                                            align_corners=False)[:, 0]
    return images * m.clamp(0, 1)[..., None].to(images)


def masked_identity(embed_images, refs, gens, ref_masks, gen_masks):
    """IS on masked references and generated (with-trigger) images: (value, clamped count)."""
    s = identity_similarity(embed_images(list(apply_masks(refs, ref_masks, "reference"))),
                            embed_images(list(apply_masks(gens, gen_masks, "generated"))))
    return s.value, s.clamped


def vision_embedder(clip_vision):
    """images -> (N, D) embeddings by a CLIP_VISION (ComfyUI's CLIPVisionLoader): `encode_image(IMAGE).image_embeds`,
    the projected embedding IPAdapter and unCLIP use. Unnormalized: the scores' cosine ignores the scale."""
    @torch.no_grad()
    def embed(images) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("no images to embed.")
        ims = [torch.as_tensor(im).float() for im in images]
        # one batch when the sizes agree; otherwise one image at a time (encode_image resizes and crops each)
        groups = [torch.stack(ims)] if all(im.shape == ims[0].shape for im in ims) else [im[None] for im in ims]
        out = [clip_vision.encode_image(g)["image_embeds"] for g in groups]
        if any(e is None or e.ndim != 2 for e in out):
            raise ValueError(vision_model_problem(clip_vision, out[0]))
        return torch.cat([e.float().cpu() for e in out])
    return embed


def vision_model_problem(clip_vision, embeds) -> str:
    kind = (getattr(clip_vision, "model_type", "")  # ComfyUI 0.3.64 keeps no model_type; only SigLIP sets this there
            or ("siglip_vision_model" if getattr(clip_vision, "return_all_hidden_states", False)
                else type(clip_vision).__name__))
    shape = "none" if embeds is None else "x".join(map(str, embeds.shape))
    return (f"the clip_vision model ({kind}) gives no single embedding per image (image_embeds {shape}): SigLIP-type "
            "vision models have no projection to one, so IS and KPS cannot be scored with it. Load a CLIP vision model "
            "(e.g. CLIP-ViT-H-14 or ViT-L-14, as IPAdapter uses) with Load CLIP Vision, or disconnect clip_vision.")


def check_vision_model(clip_vision) -> None:
    """One small image through the model before any training: a model that cannot score fails now, not after step 1."""
    vision_embedder(clip_vision)(torch.full((1, 64, 64, 3), 0.5))


def has_open_clip(checkpoint: str) -> bool:
    import folder_paths

    return folder_paths.get_full_path("clip", checkpoint) is not None


def _scores(with_t, without_t, refs, lines, checkpoint, arch, clip_vision) -> tuple[dict, object, str]:
    """(scores, image embedder, what made IS/KPS): open_clip for all three, or CLIP_VISION for IS and KPS with
    PS from open_clip when its checkpoint is in models/clip (PS needs text embeddings in the image space)."""
    prompts = (lines * with_t.shape[0] if len(lines) == 1 else lines) or None
    if clip_vision is None:
        sc = scorer(checkpoint, arch)
        return sc.evaluate(list(with_t), list(without_t), list(refs) if refs is not None else None,
                           prompts), sc.embed_images, "open_clip"
    embed = vision_embedder(clip_vision)
    s = score_images(embed, list(with_t), list(without_t), list(refs) if refs is not None else None)
    if prompts and has_open_clip(checkpoint):
        sc = scorer(checkpoint, arch)
        p = scores_from_embeddings(sc.embed_images(list(with_t)), text=sc.embed_texts(prompts))
        s["ps"] = p["ps"]
        s["clamped"]["ps"] = p["clamped"]["ps"]
    return s, embed, "CLIP vision (IS, KPS)" + (" and open_clip (PS)" if s["ps"] is not None else "")


def evaluate(with_t, without_t, refs, prompts: str, checkpoint: str, arch: str, reference_masks=None,
             generated_masks=None,
             clip_vision=None):
    """IMAGE batches (B,H,W,3) -> PS, IS, KPS (cat_train.measure.metrics definitions), a report, a chart IMAGE and IS on
    masked images (NaN without masks; generated_masks go with images_with_trigger). clip_vision: a CLIP_VISION
    model that makes the image embeddings of IS and KPS instead of open_clip."""
    if with_t.shape[0] != without_t.shape[0]:
        raise ValueError(f"{with_t.shape[0]} images with the trigger but {without_t.shape[0]} without; "
                         "KPS pairs them one to one (same seeds), so give equal batches.")
    for batch, what in ((with_t, "images_with_trigger"), (without_t, "images_without_trigger"), (refs,
            "reference_images")):
        if batch is not None:
            check_image_batch(batch, what)  # the leak scan refuses NaN too; a blank image scored KPS 0 silently
    lines = [p.strip() for p in prompts.splitlines() if p.strip()]
    if lines and len(lines) not in (1, with_t.shape[0]):
        raise ValueError(f"{len(lines)} prompts for {with_t.shape[0]} images: give one per image, or one for all.")
    s, embed, encoder = _scores(with_t, without_t, refs, lines, checkpoint, arch, clip_vision)
    nan = float("nan")
    ps, is_, kps = (nan if s["ps"] is None else s["ps"]), (nan if s["is"] is None else s["is"]), s["kps"]
    clamped = ", ".join(f"{k.upper()} {v}" for k, v in s["clamped"].items())
    report = (f"KPS {kps:.4f} (1 - H of with/without-trigger image similarity; higher = less leakage)\n"
              f"PS  {ps:.4f} (prompt fidelity)" + ("" if lines else " - no prompts given")
              + (" - no open_clip checkpoint in models/clip" if lines and s["ps"] is None else "") + "\n"
              f"IS  {is_:.4f} (identity)" + ("" if refs is not None else " - no reference images") + "\n"
              f"{s['n']} pairs; similarities clamped at 1e-6: {clamped}; image embeddings: {encoder}\n"
              "paper (Table 1): LoRA KPS 0.0808, CAT 0.1231")
    is_masked = nan
    if reference_masks is not None or generated_masks is not None:
        if refs is None:
            raise ValueError("masks were given but no reference_images: masked IS compares masked references with "
                             "masked generated images; connect reference_images.")
        is_masked, n_cl = masked_identity(embed, refs, with_t, reference_masks, generated_masks)
        report += (f"\nIS masked {is_masked:.4f} (identity on the subject only: "
                   f"{'reference' if reference_masks is not None else ''}"
                   f"{' and ' if reference_masks is not None and generated_masks is not None else ''}"
                   f"{'generated' if generated_masks is not None else ''} images masked, background black; "
                   f"{n_cl} clamped) next to IS {is_:.4f} (whole images)")
    vals = {k: v for k, v in (("PS", ps), ("IS", is_), ("IS masked", is_masked), ("KPS", kps)) if v == v}
    return ps, is_, kps, report, chart(vals), is_masked


def clip_checkpoints() -> list[str]:
    """The open_clip checkpoints in models/clip, for a node's combo (a placeholder when there is none)."""
    import folder_paths

    return folder_paths.get_filename_list("clip") or ["(none in models/clip)"]


class KpsEvaluatorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_KPSEvaluator", display_name="KPS Evaluator", category=CATEGORY, is_output_node=True,
            **search_aliases("kps", "identity similarity", "evaluate lora", "clip score"),
            description="PS, IS and KPS (CAT paper) from images with / without the trigger (same seeds) and "
                        "references.",
            inputs=[
                io.Image.Input("images_with_trigger"), io.Image.Input("images_without_trigger"),
                io.Image.Input("reference_images", optional=True),
                io.String.Input("prompts", default="", multiline=True, tooltip=
                        "one prompt per image (with the trigger); blank: no PS"),
                io.Combo.Input("clip_checkpoint", options=clip_checkpoints()),
                io.String.Input("open_clip_model", default="ViT-B-32", tooltip=
                        "open_clip architecture of the checkpoint"),
                io.Mask.Input("reference_masks", optional=True, tooltip=
                        "subject masks of the references: masked IS (CatVersion)"),
                io.Mask.Input("generated_masks", optional=True, tooltip=
                        "subject masks of images_with_trigger: masked IS"),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="a CLIP vision model (Load CLIP Vision): makes the image embeddings of IS "
                                            "and KPS instead of open_clip; PS still needs the open_clip checkpoint "
                                            "(NaN without one)"),
            ],
            outputs=[io.Float.Output(display_name="PS"), io.Float.Output(display_name="IS"),
                     io.Float.Output(display_name="KPS"),
                     io.String.Output(display_name="report"), io.Image.Output(display_name="chart"),
                     io.Float.Output(display_name="IS_masked")],
        )

    @classmethod
    def execute(cls, images_with_trigger, images_without_trigger, prompts, clip_checkpoint, open_clip_model,
                reference_images=None, reference_masks=None, generated_masks=None, clip_vision=None) -> io.NodeOutput:
        ps, is_, kps, report, chart_image, is_masked = evaluate(images_with_trigger, images_without_trigger,
                                                                reference_images, prompts,
                                                                clip_checkpoint, open_clip_model, reference_masks,
                                                                generated_masks,
                                                                clip_vision)
        return io.NodeOutput(ps, is_, kps, report, chart_image, is_masked, ui={"text": [report]})


NODES = [KpsEvaluatorNode]
