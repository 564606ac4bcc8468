"""LoRA and checkpoint families from safetensors headers (cat_train/families/headers.py): what the queue-time warning
reads."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from cat_train.families import headers as lf

T = torch.zeros(1)


def write(path, tensors: dict, meta: dict | None = None):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def sd15_ckpt(p):
    return write(p, {"model.diffusion_model.input_blocks.0.0.weight": T, "first_stage_model.encoder.conv_in.weight": T})


def sdxl_ckpt(p, adm=2816):
    return write(p, {"model.diffusion_model.input_blocks.0.0.weight": T,
                     "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, adm)})


def flux_unet(p):
    return write(p, {"double_blocks.0.img_attn.qkv.weight": T, "single_blocks.0.linear1.weight": T})


def test_model_families_from_key_names(tmp_path):
    assert lf.model_family(lf.read_header(sd15_ckpt(tmp_path / "a.safetensors"))) == "sd"
    assert lf.model_family(lf.read_header(sdxl_ckpt(tmp_path / "b.safetensors"))) == "sdxl"
    assert lf.model_family(lf.read_header(sdxl_ckpt(tmp_path / "r.safetensors", 2560))) == "sdxl"  # refiner
    assert lf.model_family(lf.read_header(sdxl_ckpt(tmp_path / "u.safetensors", 1536))) is None  # SD2 unCLIP: not said
    assert lf.model_family(lf.read_header(flux_unet(tmp_path / "c.safetensors"))) == "flux"
    assert lf.model_family(lf.read_header(write(tmp_path / "d.safetensors",
                                                {"joint_blocks.0.x_block.attn.qkv.weight": T}))) == "sd3"
    assert lf.model_family(lf.read_header(write(tmp_path / "e.safetensors",
                                                {"down_blocks.0.resnets.0.conv1.weight": T}))) is None


def test_lora_families_from_metadata_then_keys(tmp_path):
    for version, family in (("sd_v1", "sd"), ("sd_v2", "sd"), ("sdxl_base_v1-0", "sdxl"), ("flux1", "flux"),
                            ("sd3", "sd3")):
        h = lf.read_header(write(tmp_path / f"{version}.safetensors", {"lora_unet_x.lora_down.weight": T},
                                 {"ss_base_model_version": version}))
        assert lf.lora_family(h) == family, version
    assert lf.lora_family(lf.read_header(write(tmp_path / "k.safetensors", {
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": T}))) == "flux"
    assert lf.lora_family(lf.read_header(write(tmp_path / "t.safetensors",
                                               {"lora_te2_text_model_x.alpha": T}))) == "sdxl"
    assert lf.lora_family(lf.read_header(write(tmp_path / "n.safetensors",
                                               {"lora_unet_down_blocks_0.alpha": T}))) is None


def test_mismatch_names_both_files_and_families(tmp_path):
    lora = write(tmp_path / "my_sd15.safetensors", {"lora_unet_x.alpha": T}, {"ss_base_model_version": "sd_v1"})
    msg = lf.mismatch(lora, sdxl_ckpt(tmp_path / "xl.safetensors"))
    assert msg.startswith("LoRA my_sd15.safetensors was trained for SD1.x/SD2, but the model it is applied to "
                          "(xl.safetensors) is SDXL") and "use a LoRA trained for SDXL" in msg
    assert lf.mismatch(lora, sd15_ckpt(tmp_path / "v15.safetensors")) is None
    assert lf.mismatch(lora, tmp_path / "missing.safetensors") is None


def test_other_files_read_as_nothing(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"PK\x03\x04 pickle")
    (tmp_path / "b.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # a length past the file
    (tmp_path / "c.safetensors").write_bytes((5).to_bytes(8, "little") + b"[1,2]")
    (tmp_path / "d.safetensors").write_bytes(b"abc")
    for name in ("a.ckpt", "b.safetensors", "c.safetensors", "d.safetensors", "none.safetensors"):
        assert lf.read_header(tmp_path / name) is None, name
        assert lf.lora_family(lf.read_header(tmp_path / name)) is None
