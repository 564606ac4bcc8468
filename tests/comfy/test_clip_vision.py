"""The KPS Evaluator with a CLIP_VISION (what ComfyUI's CLIPVisionLoader returns), built small by ComfyUI's own
classes: IS and KPS from its image_embeds equal the open_clip path's for identical embeddings."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import pack_module


@pytest.fixture(scope="module")
def tiny_clip_vision(comfy, tmp_path_factory):
    """comfy.clip_vision.ClipVisionModel from a small config (2 layers, width 32, 32 px), weights seeded: ComfyUI's ops
    leave parameters uninitialised."""
    import comfy.clip_vision

    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
           "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
           "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
           "patch_size": 16, "projection_dim": 24, "torch_dtype": "float32"}
    path = tmp_path_factory.mktemp("clip_vision") / "tiny_clip_vision.json"
    path.write_text(json.dumps(cfg))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in cv.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.ndim > 1 else 1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return cv


def _batches():
    g = torch.Generator().manual_seed(1)
    tok, notok, ref = (torch.rand(3, 48, 48, 3, generator=g) for _ in range(3))
    return tok, notok * 0.5 + tok * 0.5, ref


def test_clip_vision_scores_equal_open_clip_path_for_identical_embeddings(comfy, tiny_open_clip, tiny_clip_vision, monkeypatch):
    ev = pack_module(comfy, "nodes.evaluate")
    metrics = pack_module(comfy, "cat_train.measure.metrics")
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_KPSEvaluator"]
    tok, notok, ref = _batches()
    out = node.execute(tok, notok, "a photo of sks dog", tiny_open_clip, "CATTinyCLIP", reference_images=ref,
                       clip_vision=tiny_clip_vision)
    ps, is_, kps, report = out.result[:4]
    embed = ev.vision_embedder(tiny_clip_vision)
    e_tok = embed(list(tok))
    assert e_tok.shape == (3, 24)
    assert torch.equal(e_tok, tiny_clip_vision.encode_image(tok)["image_embeds"].float())  # what IPAdapter/unCLIP use
    by_hand = metrics.scores_from_embeddings(e_tok, embed(list(notok)), embed(list(ref)))
    assert is_ == by_hand["is"] and kps == by_hand["kps"]
    assert 0 < kps < 1 and 0 < is_ < 1
    assert ps == ps and "CLIP vision (IS, KPS) and open_clip (PS)" in report  # PS from the open_clip checkpoint

    # the open_clip path, its image encoder swapped for the CLIP vision one: the same numbers
    sc = ev.scorer(tiny_open_clip, "CATTinyCLIP")
    own = node.execute(tok, notok, "", tiny_open_clip, "CATTinyCLIP", reference_images=ref).result
    monkeypatch.setattr(sc, "embed_images", embed)
    same = node.execute(tok, notok, "", tiny_open_clip, "CATTinyCLIP", reference_images=ref).result
    assert same[1] == is_ and same[2] == kps
    assert (own[1], own[2]) != (is_, kps)  # the encoder matters: open_clip's own embeddings score otherwise


def test_clip_vision_without_open_clip_gives_is_kps_and_says_why_no_ps(comfy, tiny_clip_vision):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_KPSEvaluator"]
    tok, notok, ref = _batches()
    ps, is_, kps, report = node.execute(tok, tok, "a photo of sks dog", "(none in models/clip)", "ViT-B-32",
                                        reference_images=tok, clip_vision=tiny_clip_vision).result[:4]
    assert ps != ps and "no open_clip checkpoint" in report
    assert kps == pytest.approx(0.0, abs=1e-12) and is_ == pytest.approx(1.0, abs=1e-12)  # identical batches
    with pytest.raises(ValueError, match="not in models/clip"):  # without CLIP vision, open_clip is still required
        node.execute(tok, tok, "", "(none in models/clip)", "ViT-B-32", reference_images=ref)


def test_dataset_images_output_is_the_folder_as_one_image_batch(comfy, tiny_sd15, dataset_dir):
    """CAT Dataset's last output: every image, in [0, 1], at the first image's size (other buckets resized), so the
    KPS Evaluator's reference_images can take it; the INT before it is the count."""
    import numpy as np
    from PIL import Image

    node = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_Dataset"]
    schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    names = [o.display_name for o in schema.outputs]
    assert names == ["dataset", "count", "info", "images"]  # shipped links are by slot: 0-2 stay where they were
    _, clip, vae = tiny_sd15
    ds, count, _info, images = node.execute(vae, clip, str(dataset_dir), "sks", "dog", ".txt", 128, True).result
    assert count == len(ds.items) == images.shape[0] == 3
    h, w = ds.pixels[0].shape[:2]
    assert images.shape == (3, h, w, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
    first = sorted(dataset_dir.glob("*.png"))[0]
    src = np.asarray(Image.open(first).convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
    assert ds.pixels[1].shape[:2] != (h, w)  # a second bucket, resized into the batch
    assert float((images[0] - torch.from_numpy(src)).abs().mean()) < 0.05  # the first image itself
