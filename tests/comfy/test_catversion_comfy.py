"""CatVersion on ComfyUI's own CLIP (sd1_clip / clip_model; SDXL's two encoders), in-process, tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cancelled_after, pack_module, shrink_for_cpu


@pytest.fixture(scope="module")
def cvdir(comfy, tmp_path_factory):
    d = tmp_path_factory.mktemp("catversion")
    comfy.folder_paths.add_model_folder_path("catversion", str(d), is_default=True)
    return d


def _encode(clip, text="a photo of a dog"):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.clone(), pooled.clone()


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dataset(comfy, folder, mpcv):
    _, clip, vae = mpcv
    return pack_module(comfy, "nodes.dataset").build_dataset(folder, vae, clip, ("sks",), "dog", ".txt", 64, False)


def test_folder_registered(comfy, cvdir):
    import os
    N = pack_module(comfy, "nodes.catversion")
    cv = pack_module(comfy, "cat_train.adapters.catversion")
    assert os.path.join(comfy.folder_paths.models_dir, "catversion") in comfy.folder_paths.get_folder_paths("catversion")
    # registered through folder_paths' API, which takes no extensions: Apply CatVersion lists the .safetensors only
    cv.save_catversion(cvdir / "listed.safetensors", {"clip_l": cv.KVEmbeddings((0,), 1, 64, 2, 3)})
    (cvdir / "notes.txt").write_text("not an embedding")
    try:
        options = {i.id: i for i in N.ApplyCatVersionNode.define_schema().inputs}["catversion_name"].options
        assert "listed.safetensors" in options and "notes.txt" not in options
        assert "notes.txt" in comfy.folder_paths.get_filename_list("catversion")  # the folder holds it: the filter works
    finally:
        (cvdir / "listed.safetensors").unlink()
        (cvdir / "notes.txt").unlink()
    assert {"CAT_CatVersionTrainer", "CAT_SaveCatVersion", "CAT_ApplyCatVersion"} <= set(comfy.nodes.NODE_CLASS_MAPPINGS)
    assert N.FOLDER == "catversion"


def test_kv_concat_matches_comfy_attention_and_input_clip_is_untouched(comfy, tiny_sd15):
    """A clone with the embeddings changes the conditioning; the input CLIP encodes bit-identically before, between
    and after (ComfyUI swaps the object patches when clones of one CLIP load in turn)."""
    _, clip, _ = tiny_sd15
    N = pack_module(comfy, "nodes.comfy_clip")
    cv = pack_module(comfy, "cat_train.adapters.catversion")
    before = _encode(clip)
    enc = N.clip_encoders(clip)
    assert list(enc) == ["clip_l"] and cv.encoder_info(enc["clip_l"]) == {"hidden": 64, "heads": 2, "layers": 3}
    emb = cv.new_embeddings(enc["clip_l"], cv.CatVersionSpec(), generator=torch.Generator().manual_seed(0))
    assert emb.layer_indices == (0, 1, 2)
    applied = N.apply_catversion(clip, {"clip_l": emb})
    on = _encode(applied)
    assert (on[0] - before[0]).abs().max() > 1e-2
    again = _encode(clip)
    assert torch.equal(again[0], before[0]) and torch.equal(again[1], before[1])
    assert torch.equal(_encode(applied)[0], on[0])
    # comfy's optimized attention on the padded mask == our SDPA path (the training path)
    with torch.inference_mode(False), torch.enable_grad():
        applied.load_model()
        grad_path = applied.cond_stage_model.encode_token_weights(applied.tokenize("a photo of a dog"))[0].detach()
    assert (grad_path - on[0]).abs().max() < 1e-4
    assert torch.equal(_encode(clip)[0], before[0])


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_trainer_leaves_inputs_and_file_changes_only_conditioning(comfy, kind, request, dataset_dir, cvdir):
    mp, clip, vae = request.getfixturevalue(f"tiny_{kind}")
    N = pack_module(comfy, "nodes.catversion")
    cv = pack_module(comfy, "cat_train.adapters.catversion")
    cvt = pack_module(comfy, "cat_train.training.catversion")
    ds = _dataset(comfy, dataset_dir, (mp, clip, vae))
    clip_before, unet_before, cond_before = _state(clip.cond_stage_model), _state(mp.model.diffusion_model), _encode(clip)
    layers = 3 if kind == "sd15" else 2  # SDXL's CLIPs output their penultimate layer: 2 of the tiny 3 reach it
    spec = cv.CatVersionSpec(layers=layers)
    cfg = cvt.CatVersionConfig(steps=3, lr=1e-2, batch_size=2, alpha=0.5 if kind == "sdxl" else 0.0, class_word="dog", seed=1)
    applied, weights, image, summary = N.train_on_clip(mp, clip, ds, spec, cfg, "7")
    assert "3/3 steps" in summary and image.shape[-1] == 3
    assert set(weights) == ({"clip_l"} if kind == "sd15" else {"clip_l", "clip_g"})
    if kind == "sdxl":
        assert weights["clip_l"].layer_indices == (0, 1) and weights["clip_g"].layer_indices == (0, 1)
    # the input CLIP and MODEL: bit-identical tensors, identical conditioning
    assert _same(clip_before, _state(clip.cond_stage_model)) and _same(unet_before, _state(mp.model.diffusion_model))
    after = _encode(clip)
    assert torch.equal(after[0], cond_before[0]) and torch.equal(after[1], cond_before[1])
    trained = _encode(applied)
    assert (trained[0] - cond_before[0]).abs().max() > 1e-3

    # Save -> Apply: the file reproduces the trainer's CLIP exactly, and only as CLIP object patches
    save, apply = (comfy.nodes.NODE_CLASS_MAPPINGS[k] for k in ("CAT_SaveCatVersion", "CAT_ApplyCatVersion"))
    path = save.execute(weights, f"{kind}_cv").result[0]
    name = path.split("/")[-1]
    assert name in comfy.folder_paths.get_filename_list("catversion")
    loaded, negative = apply.execute(clip, name).result
    assert negative is clip  # the negative prompt is encoded without the embeddings (the authors' sampler)
    on_both = apply.execute(clip, name, embeddings_on_negative=True).result
    assert on_both[1] is on_both[0] and torch.equal(_encode(on_both[1])[0], trained[0])  # the switch: earlier behaviour
    assert loaded is not clip and loaded.patcher is not clip.patcher
    # a CLIP may come with object patches of its own (ComfyUI's CLIP sets `manual_cast_dtype` as one since the
    # float32 text-encoder upcast moved into the patcher): the clone keeps each as it was and adds only the
    # self-attention forwards, one per embedded layer
    own = clip.patcher.object_patches
    assert all(loaded.patcher.object_patches.get(k, own) is v for k, v in own.items())
    added = [k for k in loaded.patcher.object_patches if k not in own]
    assert not loaded.patcher.patches and all(k.endswith(".self_attn.forward") for k in added)
    assert len(added) == sum(len(e.layer_indices) for e in weights.values())
    assert torch.equal(_encode(loaded)[0], trained[0])
    assert torch.equal(_encode(clip)[0], cond_before[0])
    assert _same(unet_before, _state(mp.model.diffusion_model)) and not mp.patches and not mp.object_patches
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["catversion_spec"])["layers"] == layers and meta["cat_factor"] == str(cfg.alpha)
    assert meta["catversion_steps"] == "3" and json.loads(meta["catversion_triggers"]) == ["sks"]


def test_bad_files_name_the_mismatch(comfy, tiny_sd15, tiny_sdxl, cvdir):
    cv = pack_module(comfy, "cat_train.adapters.catversion")
    apply = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_ApplyCatVersion"]
    _, clip15, _ = tiny_sd15
    _, clipxl, _ = tiny_sdxl
    cv.save_catversion(cvdir / "sd15_only.safetensors", {"clip_l": cv.KVEmbeddings((2,), 1, 64, 2, 3)})
    with pytest.raises(ValueError, match=r"sd15_only\.safetensors.*'clip_l' with hidden size 64, but this one has 32"):
        apply.execute(clipxl, "sd15_only.safetensors")
    cv.save_catversion(cvdir / "vitl.safetensors", {"clip_l": cv.KVEmbeddings((9, 10, 11), 1, 64, 2, 12)})
    with pytest.raises(ValueError, match=r"vitl\.safetensors.*self-attention layer count 12, but this one has 3"):
        apply.execute(clip15, "vitl.safetensors")
    cv.save_catversion(cvdir / "g_only.safetensors", {"clip_g": cv.KVEmbeddings((0,), 1, 32, 2, 3)})
    with pytest.raises(ValueError, match=r"g_only\.safetensors holds embeddings for text encoder\(s\) \['clip_g'\]"):
        apply.execute(clip15, "g_only.safetensors")
    with pytest.raises(ValueError, match="is not in"):
        apply.execute(clip15, "missing.safetensors")


def test_kps_evaluator_masked_is(comfy, tiny_open_clip):
    """Same subject on different backgrounds: masked IS is exactly 1, the whole-image IS is not."""
    kps = comfy.nodes.NODE_CLASS_MAPPINGS["CAT_KPSEvaluator"]
    g = torch.Generator().manual_seed(0)
    subject = torch.rand(3, 16, 16, 3, generator=g)
    refs, gens = torch.rand(3, 48, 48, 3, generator=g), torch.rand(3, 48, 48, 3, generator=g)
    refs[:, 16:32, 16:32], gens[:, 16:32, 16:32] = subject, subject
    mask = torch.zeros(1, 24, 24)  # one mask for all, at another size: resized to the images
    mask[:, 8:16, 8:16] = 1
    out = kps.execute(gens, gens.flip(2), "", tiny_open_clip, "CATTinyCLIP", reference_images=refs,
                      reference_masks=mask, generated_masks=mask).result
    is_plain, report, is_masked = out[1], out[3], out[5]
    assert abs(is_masked - 1) < 1e-5 and is_plain < 0.999
    assert "IS masked 1.0000" in report and f"IS {is_plain:.4f} (whole images)" in report
    plain = kps.execute(gens, gens.flip(2), "", tiny_open_clip, "CATTinyCLIP", reference_images=refs).result
    assert plain[1] == is_plain and plain[5] != plain[5]  # no masks: NaN, and the other scores unchanged
    with pytest.raises(ValueError, match="2 generated masks for 3 images"):
        kps.execute(gens, gens, "", tiny_open_clip, "CATTinyCLIP", reference_images=refs, generated_masks=mask.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="no reference_images"):
        kps.execute(gens, gens, "", tiny_open_clip, "CATTinyCLIP", generated_masks=mask)


def test_catversion_workflow_runs_end_to_end(comfy, test_checkpoint_node, tiny_open_clip, dataset_dir, cvdir):
    """workflows/api/catversion_sd15.api.json in ComfyUI's executor on the tiny model: trains, saves into
    models/catversion, samples with and without the embeddings, and scores the pairs."""
    from pathlib import Path

    from conftest import ROOT, run_prompt

    g = json.loads((ROOT / "workflows" / "api" / "catversion_sd15.api.json").read_text())
    shrink_for_cpu(g, "sd15", dataset_dir, tiny_open_clip)
    ex = run_prompt(g)
    assert ex.success, ex.status_messages[-1]
    out = ex.history_result["outputs"]
    saved = Path(out["11"]["text"][0])
    assert saved.is_file() and saved.parent == Path(comfy.folder_paths.get_folder_paths("catversion")[0])
    assert "2 pairs" in out["24"]["text"][0] and "3/3 steps" in out["10"]["text"][0]


def test_trainer_reports_like_the_lora_trainer_and_cancel_keeps_a_resumable_checkpoint(comfy, tiny_sd15, dataset_dir,
                                                                                        cvdir, tmp_path, monkeypatch):
    """The CatVersion trainer sends the LoRA trainer's progress events (the live chart draws from them), stops within
    a step on Cancel with a checkpoint, and a resume from it ends with the uninterrupted run's embeddings bit for bit."""

    mp, clip, vae = tiny_sd15
    N = pack_module(comfy, "nodes.catversion")
    cv = pack_module(comfy, "cat_train.adapters.catversion")
    cvt = pack_module(comfy, "cat_train.training.catversion")
    tr = pack_module(comfy, "nodes.common")  # the one progress callback both trainers use
    ds = _dataset(comfy, dataset_dir, tiny_sd15)
    events = []
    monkeypatch.setattr(tr, "send_event", lambda event, data: events.append((event, data)))
    spec = cv.CatVersionSpec(layers=2)
    cfg = cvt.CatVersionConfig(steps=4, lr=1e-2, batch_size=2, alpha=0.5, class_word="dog", seed=2)
    clip_before = _state(clip.cond_stage_model)
    _, full, _, _ = N.train_on_clip(mp, clip, ds, spec, cfg, "9")
    assert [e for e, _ in events] == [tr.EVENT] * 4
    data = [d for _, d in events]
    assert [d["step"] for d in data] == [1, 2, 3, 4] and {d["total"] for d in data} == {4} and {d["node"] for d in data} == {"9"}
    assert set(data[0]) == {"node", "prompt_id", "step", "total", "loss", "fit", "keep", "lr", "elapsed",
                            "first_step"}  # the LoRA trainer's
    assert {d["lr"] for d in data} == {1e-2} and all(a["elapsed"] < b["elapsed"] for a, b in zip(data, data[1:]))
    assert all(d["keep"] > 0 and d["loss"] >= d["fit"] for d in data)

    with cancelled_after(2) as seen:  # the user presses Cancel after step 2
        N.train_on_clip(mp, clip, ds, spec, cfg, "9", checkpoint_dir=str(tmp_path / "ck"))
    assert seen == [1, 2]
    ck = tmp_path / "ck" / "cat-step000002.pt"
    assert ck.is_file() and _same(clip_before, _state(clip.cond_stage_model))
    _, resumed, _, summary = N.train_on_clip(mp, clip, ds, spec, cfg, "9", resume=str(ck))
    assert "4/4 steps" in summary
    for name in full:
        assert torch.equal(full[name].keys, resumed[name].keys) and torch.equal(full[name].values, resumed[name].values)
    assert _same(clip_before, _state(clip.cond_stage_model))


def test_trigger_token_positions_come_from_the_clip_tokenizer(comfy, tiny_sd15, dataset_dir):
    """APT's align_skip_triggers needs where the trigger sits in the caption's context: CLIP's own tokens, start token first."""
    ds = _dataset(comfy, dataset_dir, tiny_sd15)
    clip = tiny_sd15[1]
    toks = clip.tokenize("a photo of sks dog")
    ids = [t[0] for t in toks[next(iter(toks))][0]]
    sks = [t[0] for t in clip.tokenize("sks")[next(iter(toks))][0]][1]
    pos = ds.token_positions("a photo of sks dog", ("sks",))
    assert pos == (4,) and ids[4] == sks  # start, a, photo, of, sks
    assert ds.token_positions("a photo of a dog", ("sks",)) == ()
