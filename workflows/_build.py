"""Writes the example workflows in API format (for `python -m cat_train queue`) and UI format (for the
graph editor) from one description. UI conversion reads the registered node schemas of a real ComfyUI:

    COMFYUI_PATH=/path/to/ComfyUI python workflows/_build.py

Build against the oldest supported ComfyUI (v0.3.64): core nodes gained outputs since (SaveImage, Preview Any), which
newer editors add on load, while an older editor would keep outputs its server does not have. The template browser's
thumbnails are made by workflows/_thumbnails.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def n(cls, **inputs):
    return {"class_type": cls, "inputs": inputs}


def train_branch(g: dict, first: int, model, clip, vae, dataset, factor: float, label: str, res: int, steps_s: int,
                 pos: str, plain: str, ckpt_prefix: str, flux: bool = False, qwen: bool = False) -> None:
    """Loss config -> trainer -> save; sample the same seeds with and without the trigger; KPS.
    flux: Flux dev sampling (FluxGuidance 3.5 on both prompts, cfg 1, simple scheduler, 16-channel latent).
    qwen: Qwen-Image sampling (cfg 2.5, simple scheduler, 16-channel latent), as ComfyUI's Qwen-Image template."""
    i = first
    g[str(i)] = n("CAT_LossConfig", cat_factor=factor, preservation="class", class_word="dog", token_weights="")
    g[str(i + 1)] = n("CAT_LoraTrainer", model=model, dataset=dataset, loss_config=[str(i), 0], rank=16, lora_alpha=16.0,
                      target="attn", steps=600, learning_rate=1e-4, lr_schedule="constant", batch_size=1, grad_accum=1,
                      seed=0, dtype="auto", gradient_checkpointing="auto", save_every=100,
                      checkpoint_name=f"{ckpt_prefix}_{label}", resume_from="", preview_every=100, vae=vae,
                      validate_every=50)
    g[str(i + 2)] = n("CAT_SaveLora", lora=[str(i + 1), 1], name=f"{ckpt_prefix}_{label}")
    g[str(i + 3)] = n("CLIPTextEncode", text=pos, clip=clip)
    g[str(i + 4)] = n("CLIPTextEncode", text=plain, clip=clip)
    g[str(i + 5)] = n("CLIPTextEncode", text="blurry, low quality", clip=clip)
    g[str(i + 6)] = n("EmptySD3LatentImage" if flux or qwen else "EmptyLatentImage", width=res, height=res, batch_size=4)
    for k, c in ((7, i + 3), (8, i + 4)):
        if flux:  # Flux dev takes its distilled guidance as a conditioning value, not through cfg
            g[str(i + k + 9)] = n("FluxGuidance", conditioning=[str(c), 0], guidance=3.5)
            c = i + k + 9
        g[str(i + k)] = n("KSampler", model=[str(i + 1), 0], seed=42, steps=steps_s,
                          cfg=1.0 if flux else 2.5 if qwen else 7.0, sampler_name="euler",
                          scheduler="simple" if flux or qwen else "normal", positive=[str(c), 0],
                          negative=[str(i + 5), 0], latent_image=[str(i + 6), 0], denoise=1.0)
    g[str(i + 9)] = n("VAEDecode", samples=[str(i + 7), 0], vae=vae)
    g[str(i + 10)] = n("VAEDecode", samples=[str(i + 8), 0], vae=vae)
    g[str(i + 11)] = n("SaveImage", images=[str(i + 9), 0], filename_prefix=f"{ckpt_prefix}/{label}_with_trigger")
    g[str(i + 12)] = n("SaveImage", images=[str(i + 10), 0], filename_prefix=f"{ckpt_prefix}/{label}_without_trigger")
    g[str(i + 13)] = n("CAT_KPSEvaluator", images_with_trigger=[str(i + 9), 0], images_without_trigger=[str(i + 10), 0],
                       reference_images=[dataset[0], DATASET_IMAGES], prompts=pos,
                       clip_checkpoint="open_clip_vit_b32.safetensors", open_clip_model="ViT-B-32")
    # charts and grids go to output/ (SaveImage), not temp/; every text result shows on the canvas (Preview Any)
    g[str(i + 14)] = n("SaveImage", images=[str(i + 1), 2], filename_prefix=f"{ckpt_prefix}/{label}_loss")
    g[str(i + 15)] = n("SaveImage", images=[str(i + 13), 4], filename_prefix=f"{ckpt_prefix}/{label}_scores")
    g[str(i + 18)] = n("SaveImage", images=[str(i + 1), 4], filename_prefix=f"{ckpt_prefix}/{label}_previews")
    g[str(i + 19)] = n("PreviewAny", source=[str(i + 1), 3])  # the trainer's summary (best step, per-step table)
    g[str(i + 20)] = n("PreviewAny", source=[str(i + 2), 0])  # the saved LoRA's path
    g[str(i + 21)] = n("PreviewAny", source=[str(i + 13), 3])  # the KPS report


DATASET_IMAGES = 3  # CAT Dataset's IMAGE output: the reference images of IS


def flux_base(res: int) -> dict:
    """Flux ships as separate files: the diffusion model, CLIP-L + T5-XXL, and its own VAE."""
    return {"1": n("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default"),
            "3": n("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux",
                   device="default"),
            "4": n("VAELoader", vae_name="ae.safetensors"),
            "2": n("CAT_Dataset", vae=["4", 0], clip=["3", 0], folder="cat_dataset", triggers="sks", class_word="dog",
                   caption_extension=".txt", resolution=res, buckets=True)}


def qwen_image_base(res: int) -> dict:
    """Qwen-Image ships as separate files too: the diffusion model, Qwen2.5-VL 7B (its text encoder) and its VAE (Wan
    2.1's)."""
    return {"1": n("UNETLoader", unet_name="qwen_image_bf16.safetensors", weight_dtype="default"),
            "3": n("CLIPLoader", clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image", device="default"),
            "4": n("VAELoader", vae_name="qwen_image_vae.safetensors"),
            "2": n("CAT_Dataset", vae=["4", 0], clip=["3", 0], folder="cat_dataset", triggers="sks", class_word="dog",
                   caption_extension=".txt", resolution=res, buckets=True)}


def base(ckpt: str, res: int) -> dict:
    return {"1": n("CheckpointLoaderSimple", ckpt_name=ckpt),
            "2": n("CAT_Dataset", vae=["1", 2], clip=["1", 1], folder="cat_dataset", triggers="sks", class_word="dog",
                   caption_extension=".txt", resolution=res, buckets=True)}


POS, PLAIN = "a photo of sks dog on the beach", "a photo of dog on the beach"
PROBES = "\n".join(["a photo of a dog", "a photo of a puppy", "a photo of a wolf", "a photo of a fox", "a photo of a cat",
                    "a photo of a person with a dog", "a dog on the beach", "a painting of a dog"])


def leak_loop() -> dict:
    """Train CAT, scan which probe prompts it moved, retrain with the worst probes as preservation prompts
    (a STRING link into Loss Config's preservation_prompts), scan again: the loop the leak scan is for."""
    g = base("v1-5-pruned-emaonly.safetensors", 512)

    def trainer(loss: int, name: str) -> dict:
        return n("CAT_LoraTrainer", model=["1", 0], dataset=["2", 0], loss_config=[str(loss), 0], rank=16, lora_alpha=16.0,
                 target="attn", steps=600, learning_rate=1e-4, lr_schedule="constant", batch_size=1, grad_accum=1, seed=0,
                 dtype="auto", gradient_checkpointing="auto", save_every=100, checkpoint_name=name, resume_from="")

    def scan(adapted: int) -> dict:
        return n("CAT_LeakScan", base_model=["1", 0], adapted_model=[str(adapted), 0], clip=["1", 1], vae=["1", 2],
                 probes=PROBES, negative="blurry, low quality", seed=42, steps=20, cfg=7.0, sampler_name="euler",
                 scheduler="normal", width=512, height=512, images_per_probe=2, top_k=3,
                 clip_checkpoint="open_clip_vit_b32.safetensors", open_clip_model="ViT-B-32")

    g["10"] = n("CAT_LossConfig", cat_factor=1.0, preservation="class", class_word="dog", token_weights="", preservation_prompts="")
    g["11"] = trainer(10, "loop_first")
    g["12"] = n("SaveImage", images=["11", 2], filename_prefix="loop/first_loss")
    g["13"] = scan(11)
    g["14"] = n("SaveImage", images=["13", 2], filename_prefix="loop/first_scan_chart")
    g["15"] = n("SaveImage", images=["13", 3], filename_prefix="loop/first_scan_grid")
    g["20"] = n("CAT_LossConfig", cat_factor=1.0, preservation="class", class_word="dog", token_weights="",
                preservation_prompts=["13", 1])
    g["21"] = trainer(20, "loop_preserved")
    g["22"] = n("CAT_SaveLora", lora=["21", 1], name="loop_cat_preserved")
    g["23"] = n("SaveImage", images=["21", 2], filename_prefix="loop/preserved_loss")
    g["24"] = scan(21)
    g["25"] = n("SaveImage", images=["24", 2], filename_prefix="loop/preserved_scan_chart")
    g["26"] = n("SaveImage", images=["24", 3], filename_prefix="loop/preserved_scan_grid")
    for k, src in ((30, ["11", 3]), (31, ["13", 0]), (32, ["21", 3]), (33, ["22", 0]), (34, ["24", 0])):
        g[str(k)] = n("PreviewAny", source=src)  # summaries, scan reports, the LoRA path: on the canvas
    return g


def catversion_sd15() -> dict:
    """CatVersion as published: train K/V embeddings on the checkpoint's CLIP with class-word captions and flips, save
    them, then the same class prompt and seeds encoded by the CLIP with and without the embeddings (same UNet), the
    negative prompt always without them (the authors' sampler), scored by the KPS Evaluator."""
    g = base("v1-5-pruned-emaonly.safetensors", 512)
    g["10"] = n("CAT_CatVersionTrainer", model=["1", 0], clip=["1", 1], dataset=["2", 0], layers=3, embeddings_per_layer=1,
                steps=1000, learning_rate=1e-2, batch_size=2, cat_factor=0.0, class_word="dog", seed=0,
                caption="class", flip=0.5, prefix_bias=0.0)
    g["11"] = n("CAT_SaveCatVersion", catversion=["10", 1], name="catversion_sks_dog")
    g["12"] = n("SaveImage", images=["10", 2], filename_prefix="catversion/loss")
    for k, clip in ((13, ["10", 0]), (14, ["1", 1])):  # with the embeddings / the checkpoint's own CLIP
        g[str(k)] = n("CLIPTextEncode", text=PLAIN, clip=clip)  # trained on class captions: the class prompt asks for it
        g[str(k + 2)] = n("CLIPTextEncode", text="blurry, low quality", clip=["1", 1])
    g["17"] = n("EmptyLatentImage", width=512, height=512, batch_size=4)
    for k, (p, q) in ((18, (13, 15)), (19, (14, 16))):
        g[str(k)] = n("KSampler", model=["1", 0], seed=42, steps=25, cfg=7.0, sampler_name="euler", scheduler="normal",
                      positive=[str(p), 0], negative=[str(q), 0], latent_image=["17", 0], denoise=1.0)
        g[str(k + 2)] = n("VAEDecode", samples=[str(k), 0], vae=["1", 2])
        g[str(k + 4)] = n("SaveImage", images=[str(k + 2), 0],
                          filename_prefix="catversion/" + ("with_embeddings" if k == 18 else "without_embeddings"))
    g["24"] = n("CAT_KPSEvaluator", images_with_trigger=["20", 0], images_without_trigger=["21", 0],
                reference_images=["2", DATASET_IMAGES], prompts=PLAIN,
                clip_checkpoint="open_clip_vit_b32.safetensors", open_clip_model="ViT-B-32")
    g["25"] = n("SaveImage", images=["24", 4], filename_prefix="catversion/scores")
    for k, src in ((26, ["10", 3]), (27, ["11", 0]), (28, ["24", 3])):
        g[str(k)] = n("PreviewAny", source=src)  # the summary, the embeddings' path, the KPS report: on the canvas
    return g


def workflows() -> dict[str, dict]:
    out = {}
    for name, ckpt, res in (("cat_sd15_train_kps", "v1-5-pruned-emaonly.safetensors", 512),
                            ("cat_sdxl_train_kps", "sd_xl_base_1.0.safetensors", 1024)):
        g = base(ckpt, res)
        train_branch(g, 10, ["1", 0], ["1", 1], ["1", 2], ["2", 0], 1.0, "cat", res, 25, POS, PLAIN, name.split("_")[1])
        out[name] = g
    g = base("v1-5-pruned-emaonly.safetensors", 512)
    train_branch(g, 10, ["1", 0], ["1", 1], ["1", 2], ["2", 0], 0.0, "lora_alpha0", 512, 25, POS, PLAIN, "compare")
    train_branch(g, 40, ["1", 0], ["1", 1], ["1", 2], ["2", 0], 1.0, "cat_alpha1", 512, 25, POS, PLAIN, "compare")
    out["cat_vs_lora_sd15"] = g
    g = flux_base(1024)
    train_branch(g, 10, ["1", 0], ["3", 0], ["4", 0], ["2", 0], 1.0, "cat", 1024, 20, POS, PLAIN, "flux", flux=True)
    out["cat_flux_train_kps"] = g
    g = qwen_image_base(1024)
    train_branch(g, 10, ["1", 0], ["3", 0], ["4", 0], ["2", 0], 1.0, "cat", 1024, 20, POS, PLAIN, "qwen_image", qwen=True)
    out["cat_qwen_image_train_kps"] = g
    out["cat_leak_scan_loop_sd15"] = leak_loop()
    out["catversion_sd15"] = catversion_sd15()
    return out


def input_specs(cls) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, is_widget) in the order the editor lays them out."""
    info = cls.INPUT_TYPES()
    rows = []
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            tname = "COMBO" if isinstance(typ, list) or typ == "COMBO" else typ
            rows.append((name, tname, opts, tname in WIDGET_TYPES and not opts.get("forceInput")))
    return rows


def control_values(name: str, typ: str, opts: dict) -> list:
    """The extra widgets_values the editor (ComfyUI frontend 1.27) stores after a widget: an INT gets a
    "control after generate" combo when its spec says control_after_generate, or, by legacy convention,
    when it is named seed/noise_seed and the spec does not say otherwise; a COMBO gets the control plus a
    filter-list text only when the spec asks. "fixed" keeps a shipped seed as shipped."""
    flag = opts.get("control_after_generate")
    if typ == "INT" and (flag if flag is not None else name in ("seed", "noise_seed")):
        return ["fixed"]
    if typ == "COMBO" and flag:
        return ["fixed", ""]
    return []


# Sizes the editor gives these nodes, rounded up: the larger of the LiteGraph canvas (LGraphNode.computeSize, frontend
# 1.27 and 1.49) and the Vue renderer ("Nodes 2.0", frontend 1.49: it lays widgets out in the DOM, taller), measured in
# Chromium; the browser test checks that loading grows none of them. Image outputs get room for a preview.
SIZES = {
    "CheckpointLoaderSimple": (340, 130), "CAT_Dataset": (340, 320), "CAT_LossConfig": (340, 370),
    "CAT_SaveLora": (340, 100), "CLIPTextEncode": (400, 150), "EmptyLatentImage": (340, 120), "KSampler": (340, 270),
    "VAEDecode": (230, 60), "SaveImage": (320, 320), "CAT_KPSEvaluator": (400, 320), "PreviewImage": (320, 320),
    "Note": (560, 360), "UNETLoader": (340, 110), "DualCLIPLoader": (340, 160), "VAELoader": (340, 90),
    "FluxGuidance": (340, 80), "PreviewAny": (400, 200), "EmptySD3LatentImage": (340, 130), "CAT_LeakScan": (420, 600),
    "CAT_SaveCatVersion": (340, 100), "CLIPLoader": (340, 130),
}
# The trainers are shipped at the size they grow to while they train, so the growth covers nothing: the live chart
# (web/cat_live_view.js, a widget of PLOT_H 150 px under the widgets) and ComfyUI's preview of the grid the trainer
# sends (at least 220 px under the chart). Measured in Chromium with a run's events on the shipped graph: the LoRA
# trainer reaches 988 px on the LiteGraph canvas and 1120 px in Nodes 2.0; the CatVersion trainer (chart, no previews)
# ~550 px on the canvas and ~710 px in Nodes 2.0.
SIZES["CAT_LoraTrainer"] = (380, 1130)
SIZES["CAT_CatVersionTrainer"] = (380, 720)
# The trainer's summary (steps, losses, checkpoint, previews, validation, the per-step table, best step) is ~16 lines
# for the shipped 600 steps saved every 100, several of them paths that wrap.
SUMMARY = (600, 480)
TITLE_H, GAP, PAD, GROUP_TITLE = 30, 30, 20, 50
# The view a workflow opens at (the editor restores extra.ds; web/cat_workflow_view.js where the template browser
# fits the graph zoomed out to blank boxes): the Note and the data group at the top left, clear of the newer
# frontend's side and top bars, at a zoom where the editor still draws text (blank boxes below 8 px / 14 px = 0.57).
VIEW_SCALE = 0.8
VIEW_OFFSET = [60, 90]

def note_text(api: dict) -> str:
    """The Note's text, written from the graph's own nodes: it names only nodes and widgets that this graph has
    (tests/comfy/test_workflows.py checks every 'Node > widget' it names against the graph)."""
    types = [v["class_type"] for v in api.values()]
    count = lambda cls: types.count(cls)
    how_many = lambda cls, name: name if count(cls) == 1 else f"each of the {count(cls)} {name} nodes"
    steps = []
    if "CheckpointLoaderSimple" in types:
        ckpt = next(v["inputs"]["ckpt_name"] for v in api.values() if v["class_type"] == "CheckpointLoaderSimple")
        family = "SDXL" if "xl" in ckpt else "SD1.5"
        steps.append(f"Load Checkpoint > ckpt_name: your {family} checkpoint (models/checkpoints).")
    if "CLIPLoader" in types:  # Qwen-Image
        steps.append("Load Diffusion Model > unet_name: Qwen-Image in bf16 (models/diffusion_models; fp8 files load but "
                     "have not been tested); Load CLIP > clip_name: Qwen2.5-VL 7B (models/text_encoders; frozen, it only "
                     "encodes captions); Load VAE > vae_name: the Qwen-Image VAE (models/vae). Needs ComfyUI v0.33 or "
                     "newer. The trainer picks the Qwen-Image LoRA targets itself from target attn/attn_ff/full.")
    elif "UNETLoader" in types:
        steps.append("Load Diffusion Model > unet_name: Flux dev in bf16 or fp16 (models/diffusion_models; fp8 files "
                     "load but have not been tested); DualCLIPLoader: clip_l and t5xxl (models/text_encoders); Load VAE > "
                     "vae_name: ae (models/vae). The trainer picks the Flux LoRA targets itself from target attn/attn_ff/full.")
    data = ("CAT Dataset > folder: your images with same-name .txt captions (a subfolder of ComfyUI/input, or a full path); "
            "triggers: your token (e.g. sks); class_word: what the subject is (e.g. dog).")
    same = []
    if "CAT_LossConfig" in types:
        same.append(f"the same class word in {how_many('CAT_LossConfig', 'CAT Loss Config')}")
    if "CAT_CatVersionTrainer" in types:
        same.append("the same class word in CatVersion Trainer > class_word")
    class_captions = any(v["class_type"] == "CAT_CatVersionTrainer" and v["inputs"].get("caption") == "class" for v in api.values())
    if "CLIPTextEncode" in types and class_captions:  # CatVersion as published trains on the class word alone
        same.append("the class word alone, no trigger, in the sampling prompts")
    elif "CLIPTextEncode" in types:
        same.append("the same trigger in the sampling prompts" + (" (the KPS Evaluator's prompts too)" if "CAT_KPSEvaluator" in types else ""))
    if same:
        data += " Use " + " and ".join(same) + "."
    steps.append(data)
    for cls, name in (("CAT_KPSEvaluator", "KPS Evaluator"), ("CAT_LeakScan", "CAT Leak Scan")):
        if cls in types:
            steps.append(f"{how_many(cls, name)} > clip_checkpoint: an open_clip checkpoint in models/clip, and "
                         "open_clip_model its architecture (OpenAI's original weights: ViT-B-32-quickgelu).")
    steps[-1] = steps[-1][0].upper() + steps[-1][1:]
    words = {2: "two", 3: "three", 4: "four"}
    text = f"Before you press Run, edit {words[len(steps)]} things:\n\n" + "\n\n".join(f"{i}. {t}" for i, t in enumerate(steps, 1))
    if "CAT_LoraTrainer" in types:
        text += ("\n\nThe trainer draws its loss curve live and checkpoints to output/cat_checkpoints/<checkpoint_name>; "
                 "after Cancel, give the last cat-stepNNNNNN.pt to resume_from.")
        text += (f"\n\nWhile it trains, {how_many('CAT_LoraTrainer', 'CAT LoRA Trainer')} > preview_every draws previews on "
                 "the node (same noise every round), and validate_every draws fit and keep drift next to the loss. Add a "
                 "Load CLIP Vision into its clip_vision for IS and KPS at every saved step and the best step's file.")
    if "CAT_LossConfig" in types:
        text += " cat_factor 0 is plain LoRA."
    if "CAT_CatVersionTrainer" in types:
        text += ("\n\nCatVersion Trainer learns the subject as K/V embeddings in CLIP (UNet and CLIP stay frozen) and "
                 "draws its loss curve; cat_factor 0 is CatVersion as published. CatVersion Trainer > caption 'class' trains on "
                 "the class word instead of the trigger (as published), so the class prompt with the embeddings draws the "
                 "subject; the negative prompt is encoded without them, as the authors' sampler.")
    return text


def size_of(api: dict, nid: int) -> tuple[int, int]:
    node = api[str(nid)]
    src = node["inputs"].get("source")
    if node["class_type"] == "PreviewAny" and api[src[0]]["class_type"] in ("CAT_LoraTrainer", "CAT_CatVersionTrainer") \
            and src[1] == 3:
        return SUMMARY
    return SIZES[node["class_type"]]


def layout(api: dict) -> tuple[dict[int, tuple[list[int], list[int]]], list[dict], dict]:
    """Node id -> (pos, size), groups and a Note: groups in rows (data; then per trained adapter:
    training, sampling, evaluation), each group a few columns of nodes stacked top to bottom."""
    by_type: dict[str, list[int]] = {}
    for nid, node in sorted(api.items(), key=lambda kv: int(kv[0])):
        by_type.setdefault(node["class_type"], []).append(int(nid))
    trainers = by_type.get("CAT_LoraTrainer", [])
    places, groups = {}, []

    def group(name: str, columns: list[list[int]], x: int, y: int, color: str) -> tuple[int, int]:
        """Places the columns inside a group at (x, y); returns the group's width and height."""
        cx, bottom = x + PAD, y
        for col in columns:
            cy, width = y + GROUP_TITLE + TITLE_H, 0
            for nid in col:
                w, h = size_of(api, nid)
                places[nid] = ([cx, cy], [w, h])
                cy += h + TITLE_H + GAP
                width = max(width, w)
            cx += width + 2 * PAD
            bottom = max(bottom, cy - GAP)
        w, h = cx - PAD - x, bottom - y + PAD
        groups.append({"id": len(groups) + 1, "title": name, "bounding": [x, y, w, h], "color": color, "font_size": 24,
                       "flags": {}})
        return w, h

    note_id = max(int(k) for k in api) + 1
    nw, nh = SIZES["Note"]
    places[note_id] = ([40, 40 + TITLE_H], [nw, nh])
    gx = 40 + nw + 60
    loaders = by_type.get("CheckpointLoaderSimple") or (by_type["UNETLoader"] + by_type.get("DualCLIPLoader", [])
                                                        + by_type.get("CLIPLoader", []) + by_type["VAELoader"])
    dataset = by_type["CAT_Dataset"][0]
    _, dh = group("Data: base model and training images", [loaders, [dataset]], gx, 40, "#3f789e")
    y = 40 + max(dh, nh + TITLE_H) + 60
    if "CAT_LeakScan" in by_type:  # the loop: one row, train -> scan -> retrain -> scan again
        x = 40
        (first, second), (scan1, scan2) = trainers, by_type["CAT_LeakScan"]
        previews = lambda k: sorted(int(m) for m, v in api.items() if v["class_type"] in ("PreviewAny", "SaveImage")
                                    and int(next(iter(v["inputs"].values()))[0]) == k)
        for title, cols, color in (
                ("1. Training: CAT with the class prompt", [[int(api[str(first)]["inputs"]["loss_config"][0])] + previews(first), [first]], "#8a5a2b"),
                ("2. Sampling and evaluation: leak scan, base vs CAT (same seeds)", [[scan1], previews(scan1)], "#6a4a8a"),
                ("3. Training again: the worst probes preserved", [[int(api[str(second)]["inputs"]["loss_config"][0])] + previews(second),
                                                                   [second] + [k for k in by_type["CAT_SaveLora"]]
                                                                   + [p for k in by_type["CAT_SaveLora"] for p in previews(k)]],
                 "#8a5a2b"),
                ("4. Sampling and evaluation: leak scan again", [[scan2], previews(scan2)], "#6a4a8a")):
            w, _ = group(title, cols, x, y, color)
            x += w + 60
        trainers = []
    if "CAT_CatVersionTrainer" in by_type:  # train -> sample with/without the embeddings -> KPS, one row
        ids = lambda cls: by_type.get(cls, [])
        (t,), enc = ids("CAT_CatVersionTrainer"), ids("CLIPTextEncode")
        fed_by = lambda cls, k: [int(m) for m, v in sorted(api.items(), key=lambda kv: int(kv[0])) if v["class_type"] == cls
                                 and int(next(iter(v["inputs"].values()))[0]) == k]
        save, kps = ids("CAT_SaveCatVersion"), ids("CAT_KPSEvaluator")
        samples = [k for k in ids("SaveImage") if api[str(k)]["class_type"] == "SaveImage"
                   and api[str(api[str(k)]["inputs"]["images"][0])]["class_type"] == "VAEDecode"]
        x = 40
        for title, cols, color in (
                ("Training: CatVersion (K/V embeddings in CLIP)",
                 [[t] + fed_by("PreviewAny", t), save + fed_by("PreviewAny", save[0]) + fed_by("SaveImage", t)], "#8a5a2b"),
                ("Sampling: the same seeds, CLIP with and without the embeddings",
                 [enc + ids("EmptyLatentImage"), ids("KSampler"), ids("VAEDecode"), samples], "#3f7a4a"),
                ("Evaluation: PS, IS, KPS", [kps + fed_by("PreviewAny", kps[0]) + fed_by("SaveImage", kps[0])], "#6a4a8a")):
            w, _ = group(title, cols, x, y, color)
            x += w + 60
    for t in trainers:
        loss_cfg = int(api[str(t)]["inputs"]["loss_config"][0])
        alpha = api[str(loss_cfg)]["inputs"]["cat_factor"]

        def users(k, cls=None):
            return sorted(int(n) for n, v in api.items() if (cls is None or v["class_type"] == cls)
                          and any(isinstance(x, list) and int(x[0]) == k for x in v["inputs"].values()))
        save, (curve, grid) = users(t, "CAT_SaveLora")[0], users(t, "SaveImage")
        summary, path_text = users(t, "PreviewAny")[0], users(save, "PreviewAny")[0]
        samplers = users(t, "KSampler")
        pos = [int(api[str(s)]["inputs"]["positive"][0]) for s in samplers]
        neg = int(api[str(samplers[0])]["inputs"]["negative"][0])
        latent = int(api[str(samplers[0])]["inputs"]["latent_image"][0])
        decodes = [users(s, "VAEDecode")[0] for s in samplers]
        saves = [users(d, "SaveImage")[0] for d in decodes]
        kps = users(decodes[0], "CAT_KPSEvaluator")[0]
        chart, report = users(kps, "SaveImage")[0], users(kps, "PreviewAny")[0]
        label = "plain LoRA (cat_factor 0)" if alpha == 0 else f"CAT (cat_factor {alpha:g})"
        x = 40
        w, h1 = group(f"Training: {label}", [[loss_cfg, save, path_text, curve, grid], [t, summary]], x, y, "#8a5a2b")
        x += w + 60
        guided = [p for p in pos if api[str(p)]["class_type"] == "FluxGuidance"]
        texts = [int(api[str(p)]["inputs"]["conditioning"][0]) for p in guided] if guided else pos
        columns = [texts + [neg, latent]] + ([guided] if guided else []) + [samplers, decodes, saves]
        w, h2 = group("Sampling: the same seeds with and without the trigger", columns, x, y, "#3f7a4a")
        x += w + 60
        _, h3 = group("Evaluation: PS, IS, KPS", [[kps, report, chart]], x, y, "#6a4a8a")
        y += max(h1, h2, h3) + 60
    note = {"id": note_id, "type": "Note", "pos": places[note_id][0], "size": places[note_id][1], "flags": {}, "order": 0,
            "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
            "widgets_values": [note_text(api)],
            "color": "#432", "bgcolor": "#653"}
    return places, groups, note


def to_ui(api: dict, mappings: dict) -> dict:
    """API graph -> litegraph UI graph (nodes, links, widgets_values, groups, a Note) for the schemas in `mappings`."""
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for nid, node in api.items():
        for name, v in node["inputs"].items():
            if isinstance(v, list):
                lid = len(links) + 1
                links.append([lid, int(v[0]), int(v[1]), int(nid), name, None])
                out_links.setdefault((int(v[0]), int(v[1])), []).append(lid)
    places, groups, note = layout(api)
    for order, (nid, node) in enumerate(sorted(api.items(), key=lambda kv: int(kv[0]))):
        cls = mappings[node["class_type"]]
        inputs, widgets = [], []
        for name, typ, opts, is_widget in input_specs(cls):
            v = node["inputs"].get(name)
            if is_widget and not isinstance(v, list):
                widgets.append(v if name in node["inputs"] else opts.get("default", ""))
                widgets.extend(control_values(name, typ, opts))
                continue
            link = next((l for l in links if l[3] == int(nid) and l[4] == name), None)
            entry = {"name": name, "type": typ, "link": link[0] if link else None}
            if is_widget:
                entry["widget"] = {"name": name}
                # a widget fed by a link keeps its slot in widgets_values (the editor maps values by position)
                widgets.append(opts.get("default", ""))
                widgets.extend(control_values(name, typ, opts))
            if link:  # a link carries its source output's type (an ANY input such as Preview Any's takes any)
                link[4] = len(inputs)
                link[5] = mappings[api[str(link[1])]["class_type"]].RETURN_TYPES[link[2]]
            inputs.append(entry)
        rtypes = list(cls.RETURN_TYPES)
        rnames = list(getattr(cls, "RETURN_NAMES", None) or rtypes)
        outputs = [{"name": rnames[s], "type": t, "links": out_links.get((int(nid), s), []), "slot_index": s}
                   for s, t in enumerate(rtypes)]
        pos, size = places[int(nid)]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": pos, "size": size,
                      "flags": {}, "order": order + 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    nodes.insert(0, note)
    return {"last_node_id": note["id"], "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": VIEW_SCALE, "offset": VIEW_OFFSET}},
            "version": 0.4}


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests" / "comfy"))
    import tempfile

    from conftest import boot_comfy  # boots the ComfyUI at COMFYUI_PATH with this pack loaded

    ns = boot_comfy(Path(tempfile.mkdtemp()))
    for name, api in workflows().items():
        for node in api.values():  # every widget spelled out, so the editor's prompt equals this file input for input
            for key, typ, opts, is_widget in input_specs(ns.nodes.NODE_CLASS_MAPPINGS[node["class_type"]]):
                if is_widget and key not in node["inputs"] and "default" in opts:
                    node["inputs"][key] = opts["default"]
        (HERE / "api" / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n")
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(api, ns.nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
