"""Writes the example workflows in API format (for `python -m cat_train queue`) and UI format (for the
graph editor) from one description. UI conversion reads the registered node schemas of a real ComfyUI:

    COMFYUI_PATH=/path/to/ComfyUI python workflows/_build.py
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
                 pos: str, plain: str, ckpt_prefix: str) -> None:
    """Loss config -> trainer -> save; sample the same seeds with and without the trigger; KPS."""
    i = first
    g[str(i)] = n("CAT_LossConfig", cat_factor=factor, preservation="class", class_word="dog", token_weights="")
    g[str(i + 1)] = n("CAT_LoraTrainer", model=model, dataset=dataset, loss_config=[str(i), 0], rank=16, lora_alpha=16.0,
                      target="attn", steps=600, learning_rate=1e-4, lr_schedule="constant", batch_size=1, grad_accum=1,
                      seed=0, dtype="bf16", gradient_checkpointing=False, save_every=100,
                      checkpoint_name=f"{ckpt_prefix}_{label}", resume_from="")
    g[str(i + 2)] = n("CAT_SaveLora", lora=[str(i + 1), 1], name=f"{ckpt_prefix}_{label}")
    g[str(i + 3)] = n("CLIPTextEncode", text=pos, clip=clip)
    g[str(i + 4)] = n("CLIPTextEncode", text=plain, clip=clip)
    g[str(i + 5)] = n("CLIPTextEncode", text="blurry, low quality", clip=clip)
    g[str(i + 6)] = n("EmptyLatentImage", width=res, height=res, batch_size=4)
    for k, c in ((7, i + 3), (8, i + 4)):
        g[str(i + k)] = n("KSampler", model=[str(i + 1), 0], seed=42, steps=steps_s, cfg=7.0, sampler_name="euler",
                          scheduler="normal", positive=[str(c), 0], negative=[str(i + 5), 0], latent_image=[str(i + 6), 0],
                          denoise=1.0)
    g[str(i + 9)] = n("VAEDecode", samples=[str(i + 7), 0], vae=vae)
    g[str(i + 10)] = n("VAEDecode", samples=[str(i + 8), 0], vae=vae)
    g[str(i + 11)] = n("SaveImage", images=[str(i + 9), 0], filename_prefix=f"{ckpt_prefix}/{label}_with_trigger")
    g[str(i + 12)] = n("SaveImage", images=[str(i + 10), 0], filename_prefix=f"{ckpt_prefix}/{label}_without_trigger")
    g[str(i + 13)] = n("CAT_KPSEvaluator", images_with_trigger=[str(i + 9), 0], images_without_trigger=[str(i + 10), 0],
                       prompts=pos, clip_checkpoint="open_clip_vit_b32.safetensors", open_clip_model="ViT-B-32")
    g[str(i + 14)] = n("PreviewImage", images=[str(i + 1), 2])
    g[str(i + 15)] = n("PreviewImage", images=[str(i + 13), 4])


def base(ckpt: str, res: int) -> dict:
    return {"1": n("CheckpointLoaderSimple", ckpt_name=ckpt),
            "2": n("CAT_Dataset", vae=["1", 2], clip=["1", 1], folder="cat_dataset", triggers="sks", class_word="dog",
                   caption_extension=".txt", resolution=res, buckets=True)}


POS, PLAIN = "a photo of sks dog on the beach", "a photo of dog on the beach"


def workflows() -> dict[str, dict]:
    out = {}
    for name, ckpt, res in (("cat_sd15_train_kps", "v1-5-pruned-emaonly.safetensors", 512),
                            ("cat_sdxl_train_kps", "sd_xl_base_1.0.safetensors", 1024)):
        g = base(ckpt, res)
        train_branch(g, 10, ["1", 0], ["1", 1], ["1", 2], ["2", 0], 1.0, "cat", res, 25, POS, PLAIN, name.split("_")[1])
        out[name] = g
    g = base("v1-5-pruned-emaonly.safetensors", 512)
    train_branch(g, 10, ["1", 0], ["1", 1], ["1", 2], ["2", 0], 0.0, "lora_alpha0", 512, 25, POS, PLAIN, "compare")
    train_branch(g, 30, ["1", 0], ["1", 1], ["1", 2], ["2", 0], 1.0, "cat_alpha1", 512, 25, POS, PLAIN, "compare")
    out["cat_vs_lora_sd15"] = g
    return out


def input_specs(cls) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, is_widget) in the order the editor lays them out."""
    info = cls.INPUT_TYPES()
    rows = []
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            tname = "COMBO" if isinstance(typ, list) else typ
            rows.append((name, tname, opts, tname in WIDGET_TYPES and not opts.get("forceInput")))
    return rows


def to_ui(api: dict, mappings: dict) -> dict:
    """API graph -> litegraph UI graph (nodes, links, widgets_values) for the node schemas in `mappings`."""
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for nid, node in api.items():
        for name, v in node["inputs"].items():
            if isinstance(v, list):
                lid = len(links) + 1
                links.append([lid, int(v[0]), int(v[1]), int(nid), name, None])
                out_links.setdefault((int(v[0]), int(v[1])), []).append(lid)
    for order, (nid, node) in enumerate(sorted(api.items(), key=lambda kv: int(kv[0]))):
        cls = mappings[node["class_type"]]
        inputs, widgets = [], []
        for name, typ, opts, is_widget in input_specs(cls):
            v = node["inputs"].get(name)
            if is_widget and not isinstance(v, list):
                widgets.append(v if name in node["inputs"] else opts.get("default", ""))
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
                continue
            link = next((l for l in links if l[3] == int(nid) and l[4] == name), None)
            entry = {"name": name, "type": typ, "link": link[0] if link else None}
            if is_widget:
                entry["widget"] = {"name": name}
            if link:
                link[4] = len(inputs)
                link[5] = typ
            inputs.append(entry)
        rtypes = list(cls.RETURN_TYPES)
        rnames = list(getattr(cls, "RETURN_NAMES", None) or rtypes)
        outputs = [{"name": rnames[s], "type": t, "links": out_links.get((int(nid), s), []), "slot_index": s}
                   for s, t in enumerate(rtypes)]
        col, row = divmod(order, 6)
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 380 * col, 40 + 200 * row], "size": [340, 160],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    return {"last_node_id": max(int(k) for k in api), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "tests" / "comfy"))
    import tempfile

    from conftest import boot_comfy  # boots the ComfyUI at COMFYUI_PATH with this pack loaded

    ns = boot_comfy(Path(tempfile.mkdtemp()))
    for name, api in workflows().items():
        (HERE / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n")
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(api, ns.nodes.NODE_CLASS_MAPPINGS), indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
