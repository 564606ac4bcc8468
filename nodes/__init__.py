"""ComfyUI-CAT nodes (V3 API). Ids are prefixed CAT_ so they never clash with built-ins."""
from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

from ..cat_train import families
from ..cat_train.adapter import LoraSpec
from ..cat_train.loss import CatLossConfig
from ..cat_train.precision import CHOICES as COMPUTE_CHOICES
from ..cat_train.train import TrainConfig

CATEGORY = "CAT (contrastive adapter training)"
Dataset = io.Custom("CAT_DATASET")
LossConfig = io.Custom("CAT_LOSS_CONFIG")


def _resolve_folder(folder: str) -> Path:
    import folder_paths

    p = Path(folder.strip()).expanduser()
    return p if p.is_absolute() else Path(folder_paths.get_input_directory()) / p


class CatDatasetNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_Dataset", display_name="CAT Dataset", category=CATEGORY,
            description="Images + same-name captions from a folder, encoded once with the graph's VAE and CLIP.",
            inputs=[
                io.Vae.Input("vae"), io.Clip.Input("clip"),
                io.String.Input("folder", default="cat_dataset", tooltip="subfolder of ComfyUI's input folder, or a full path"),
                io.String.Input("triggers", default="sks", tooltip="trigger token(s), comma separated"),
                io.String.Input("class_word", default="", tooltip="e.g. 'dog'; used for captionless images"),
                io.String.Input("caption_extension", default=".txt"),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64),
                io.Boolean.Input("buckets", default=True, tooltip="keep aspect ratios (sides multiples of 64)"),
            ],
            outputs=[Dataset.Output(display_name="dataset"), io.Int.Output(display_name="images"),
                     io.String.Output(display_name="info")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, caption_extension, **kw):
        root = _resolve_folder(folder)  # re-encode when files change, not on every queue
        return tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())) if root.is_dir() else folder

    @classmethod
    def execute(cls, vae, clip, folder, triggers, class_word, caption_extension, resolution, buckets) -> io.NodeOutput:
        from .dataset import build_dataset

        trig = tuple(t.strip() for t in triggers.split(",") if t.strip())
        ds = build_dataset(_resolve_folder(folder), vae, clip, trig, class_word.strip(), caption_extension, resolution, buckets)
        info = f"{len(ds.items)} images in {len(ds.buckets)} bucket(s): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(ds.buckets.items()))
        if ds.skipped:
            info += f"\nskipped {len(ds.skipped)} unreadable file(s): " + ", ".join(ds.skipped)
        if ds.warnings:
            info += "\n" + "\n".join(ds.warnings)
        return io.NodeOutput(ds, len(ds.items), info)


class CatLossConfigNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_LossConfig", display_name="CAT Loss Config", category=CATEGORY,
            description="L = ||eps - eps'(z,t,y_T)||^2 + alpha * ||eps(z,t,y) - eps'(z,t,y)||^2; alpha 0 = plain LoRA.",
            inputs=[
                io.Float.Input("cat_factor", default=1.0, min=0.0, max=10.0, step=0.05, tooltip="alpha; the paper used 0.5-2"),
                io.Combo.Input("preservation", options=["class", "strip", "empty"], default="class",
                               tooltip="y = caption with the trigger replaced by the class word / removed / empty"),
                io.String.Input("class_word", default="",
                                tooltip="e.g. 'dog'; several triggers: one class word each, 'sks=dog, zwx=cat'"),
                io.String.Input("token_weights", default="", multiline=True, tooltip="multi-concept: one 'token=weight' per line"),
                io.String.Input("preservation_prompts", default="", multiline=True, optional=True,
                                tooltip="optional: one prompt per line; each image is paired with each as y, so the CAT term "
                                        "keeps all of them (e.g. neighbouring classes a leak scan flagged). Empty: y from "
                                        "the caption by the preservation mode"),
                io.Custom("CAT_APT_OPTIONS").Input("apt", optional=True,
                                                   tooltip="optional: APT's regularizers from an APT Options node"),
            ],
            outputs=[LossConfig.Output(display_name="loss_config")],
        )

    @classmethod
    def execute(cls, cat_factor, preservation, class_word, token_weights, preservation_prompts="", apt=None) -> io.NodeOutput:
        from ..cat_train.checks import parse_token_weights

        weights = parse_token_weights(token_weights)
        prompts = tuple(line.strip() for line in (preservation_prompts or "").splitlines() if line.strip())
        cfg = CatLossConfig(cat_factor, preservation, class_word.strip(), weights, prompts)
        if apt is not None:
            cfg.apt = apt
        return io.NodeOutput(cfg)


class CatTrainerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_LoraTrainer", display_name="CAT LoRA Trainer", category=CATEGORY, not_idempotent=False,
            description="Trains a CAT LoRA; returns a clone of MODEL with it applied (the input MODEL is untouched).",
            inputs=[
                io.Model.Input("model"), Dataset.Input("dataset"), LossConfig.Input("loss_config"),
                io.Int.Input("rank", default=16, min=1, max=256),
                io.Float.Input("lora_alpha", default=16.0, min=0.01, max=1024.0, step=0.5),
                io.Combo.Input("target", options=list(families.TARGETS), default="attn"),
                io.Int.Input("steps", default=600, min=1, max=100000),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5),
                io.Combo.Input("lr_schedule", options=["constant", "cosine"], default="constant"),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("grad_accum", default=1, min=1, max=64),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
                io.Combo.Input("dtype", options=list(COMPUTE_CHOICES), default="auto",
                               tooltip="compute dtype of the training forward; base weights keep their stored dtype and "
                                       "LoRA weights are fp32. auto: bf16 on GPUs that have it, else fp16; on the CPU "
                                       "bf16 for a bf16 model, else fp32"),
                io.Combo.Input("gradient_checkpointing", options=["auto", "on", "off"], default="auto",
                               tooltip="auto: on only when the memory budget printed before step 1 says it is needed"),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip="every N steps: a resumable checkpoint and a loadable LoRA "
                                     "models/loras/<checkpoint name>_stepNNNNNN.safetensors (0: checkpoint on cancel/error only)"),
                io.String.Input("checkpoint_name", default="cat_run", tooltip="folder under output/cat_checkpoints/"),
                io.String.Input("resume_from", default="", optional=True, tooltip="a cat-stepNNNNNN.pt checkpoint to continue"),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), io.LoraModel.Output(display_name="lora"),
                     io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="summary")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, checkpoint_name=None):
        import folder_paths

        from .lora_io import name_problem

        return name_problem(Path(folder_paths.get_output_directory()) / "cat_checkpoints", checkpoint_name,
                            "checkpoint_name", "output/cat_checkpoints", "cat_run")

    @classmethod
    def execute(cls, model, dataset, loss_config, rank, lora_alpha, target, steps, learning_rate, lr_schedule, batch_size,
                grad_accum, seed, dtype, gradient_checkpointing, save_every, checkpoint_name, resume_from="") -> io.NodeOutput:
        import folder_paths

        from ..cat_train.checks import check_concepts
        from .lora_io import safe_subpath
        from .trainer import step_lora_writer, train_on_model

        ckpt_root = Path(folder_paths.get_output_directory()) / "cat_checkpoints"
        ckpt_dir = safe_subpath(ckpt_root, checkpoint_name, "checkpoint_name", "output/cat_checkpoints", "cat_run")
        check_concepts(dataset.triggers, loss_config)  # before any model work: weights of non-triggers, y = y_T
        resume = resume_from.strip() if resume_from else ""
        if resume and not os.path.isabs(resume):
            resume = str(ckpt_root / resume)
        if resume and not os.path.isfile(resume):
            raise ValueError(f"resume checkpoint {resume} does not exist; give a cat-stepNNNNNN.pt file (full path or relative to {ckpt_root}).")
        cfg = TrainConfig(steps=steps, lr=learning_rate, lr_schedule=lr_schedule, batch_size=batch_size, grad_accum=grad_accum,
                          seed=seed,
                          save_every=save_every, checkpoint_dir=str(ckpt_dir))
        spec = LoraSpec(rank=rank, alpha=lora_alpha, preset=target)
        patched, lora, image, summary, _ = train_on_model(
            model, dataset, loss_config, spec, cfg, cls.hidden.unique_id, resume, compute=dtype, checkpointing=gradient_checkpointing,
            on_save=step_lora_writer(model, folder_paths.get_folder_paths("loras")[0], checkpoint_name.strip(), loss_config, spec, cfg,
                                     dataset) if save_every else None)
        return io.NodeOutput(patched, lora, image, summary)


class SaveCatLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CAT_SaveLora", display_name="Save CAT LoRA", category=CATEGORY, is_output_node=True,
            description="Writes the LoRA (kohya keys + training metadata) into the loras folder; never overwrites.",
            inputs=[io.LoraModel.Input("lora"), io.String.Input("name", default="cat_lora")],
            outputs=[io.String.Output(display_name="path")],
        )

    @classmethod
    def validate_inputs(cls, name=None):
        import folder_paths

        from .lora_io import name_problem

        return name_problem(folder_paths.get_folder_paths("loras")[0], name, "LoRA name", "the loras folder", "my_concept")

    @classmethod
    def execute(cls, lora, name) -> io.NodeOutput:
        import folder_paths

        from ..cat_train.export import save_lora
        from .lora_io import safe_lora_path

        path = save_lora(safe_lora_path(folder_paths.get_folder_paths("loras")[0], name), dict(lora), getattr(lora, "metadata", {}))
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


class KpsEvaluatorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="CAT_KPSEvaluator", display_name="KPS Evaluator", category=CATEGORY, is_output_node=True,
            description="PS, IS and KPS (CAT paper) from images with / without the trigger (same seeds) and references.",
            inputs=[
                io.Image.Input("images_with_trigger"), io.Image.Input("images_without_trigger"),
                io.Image.Input("reference_images", optional=True),
                io.String.Input("prompts", default="", multiline=True, tooltip="one prompt per image (with the trigger); blank: no PS"),
                io.Combo.Input("clip_checkpoint", options=folder_paths.get_filename_list("clip") or ["(none in models/clip)"]),
                io.String.Input("open_clip_model", default="ViT-B-32", tooltip="open_clip architecture of the checkpoint"),
                io.Mask.Input("reference_masks", optional=True, tooltip="subject masks of the references: masked IS (CatVersion)"),
                io.Mask.Input("generated_masks", optional=True, tooltip="subject masks of images_with_trigger: masked IS"),
            ],
            outputs=[io.Float.Output(display_name="PS"), io.Float.Output(display_name="IS"), io.Float.Output(display_name="KPS"),
                     io.String.Output(display_name="report"), io.Image.Output(display_name="chart"),
                     io.Float.Output(display_name="IS_masked")],
        )

    @classmethod
    def execute(cls, images_with_trigger, images_without_trigger, prompts, clip_checkpoint, open_clip_model,
                reference_images=None, reference_masks=None, generated_masks=None) -> io.NodeOutput:
        from .evaluate import evaluate

        ps, is_, kps, report, chart, is_masked = evaluate(images_with_trigger, images_without_trigger, reference_images, prompts,
                                                          clip_checkpoint, open_clip_model, reference_masks, generated_masks)
        return io.NodeOutput(ps, is_, kps, report, chart, is_masked, ui={"text": [report]})


class LeakScanNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers
        import folder_paths

        from ..cat_train.leak import DEFAULT_PROBES

        return io.Schema(
            node_id="CAT_LeakScan", display_name="CAT Leak Scan", category=CATEGORY, is_output_node=True,
            description="Which prompts did the adapter change? Base vs adapted MODEL on probe prompts (same seeds), "
                        "CLIP similarity per pair, probes ranked by drift; the worst are the ones to preserve.",
            inputs=[
                io.Model.Input("base_model"), io.Model.Input("adapted_model", tooltip="e.g. the trainer's MODEL output"),
                io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.String.Input("probes", default=DEFAULT_PROBES, multiline=True,
                                tooltip="one prompt per line, without the trigger: the class and its neighbours"),
                io.String.Input("negative", default="", multiline=True),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True, tooltip="the same seeds for base and adapted"),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("images_per_probe", default=2, min=1, max=64),
                io.Int.Input("top_k", default=3, min=1, max=100, tooltip="how many drifting probes to list for preservation"),
                io.Combo.Input("clip_checkpoint", options=folder_paths.get_filename_list("clip") or ["(none in models/clip)"]),
                io.String.Input("open_clip_model", default="ViT-B-32", tooltip="open_clip architecture of the checkpoint"),
            ],
            outputs=[io.String.Output(display_name="report"), io.String.Output(display_name="worst_probes"),
                     io.Image.Output(display_name="chart"), io.Image.Output(display_name="grid")],
        )

    @classmethod
    def execute(cls, base_model, adapted_model, clip, vae, probes, negative, seed, steps, cfg, sampler_name, scheduler,
                width, height, images_per_probe, top_k, clip_checkpoint, open_clip_model) -> io.NodeOutput:
        from .leak_scan import leak_scan

        report, worst, chart, grid = leak_scan(base_model, adapted_model, clip, vae, probes, negative, seed, steps, cfg,
                                               sampler_name, scheduler, width, height, images_per_probe, top_k,
                                               clip_checkpoint, open_clip_model)
        return io.NodeOutput(report, worst, chart, grid, ui={"text": [report]})


class CatExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .apt import NODES as APT_NODES
        from .catversion import NODES as CATVERSION_NODES

        return [CatDatasetNode, CatLossConfigNode, CatTrainerNode, SaveCatLoraNode, KpsEvaluatorNode, LeakScanNode,
                *APT_NODES, *CATVERSION_NODES]


async def comfy_entrypoint() -> ComfyExtension:
    return CatExtension()
