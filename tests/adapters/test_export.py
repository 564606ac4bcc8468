"""Kohya LoRA export: ldm -> diffusers names, save/load round trip, the saved delta reproduces the adapter."""
import json
import os
import sys

import pytest
import torch

from cat_train.adapters import export as E
from cat_train.adapters.lora import LoraSpec, inject_lora, lora_layers, lora_weights, remove_lora
from cat_train.families.ldm_names import ldm_to_diffusers
from cat_train.world.unet import SD15_CONFIG, SDXL_CONFIG, TINY_CONFIG, UNet


def meta_names(config):
    with torch.device("meta"):  # instant, no memory: only the module tree matters
        unet = UNet(**config)
    return unet, ldm_to_diffusers(n for n, _ in unet.named_modules())


@pytest.fixture(scope="module")
def sd15():
    return meta_names(SD15_CONFIG)


@pytest.fixture(scope="module")
def sdxl():
    return meta_names(SDXL_CONFIG)


SD15_PAIRS = {
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.2.1.transformer_blocks.0.attn2.to_k": "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.1.0.in_layers.0": "down_blocks.0.resnets.0.norm1",
    "input_blocks.1.0.out_layers.3": "down_blocks.0.resnets.0.conv2",
    "input_blocks.1.0.out_layers.0": "down_blocks.0.resnets.0.norm2",
    "input_blocks.1.0.emb_layers.1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
    "input_blocks.8.1.proj_in": "down_blocks.2.attentions.1.proj_in",
    "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
    "middle_block.0.in_layers.2": "mid_block.resnets.0.conv1",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
    "output_blocks.0.0.skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0":
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
    "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
    "output_blocks.11.1.norm": "up_blocks.3.attentions.2.norm",
    "output_blocks.9.0.in_layers.2": "up_blocks.3.resnets.0.conv1",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
SDXL_PAIRS = {  # level 0 has no transformer; the first output level (level 2) has one, so its Upsample is child 2
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.1.transformer_blocks.1.attn2.to_v": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
    "input_blocks.8.1.transformer_blocks.9.ff.net.2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "middle_block.1.transformer_blocks.9.attn1.to_q": "mid_block.attentions.0.transformer_blocks.9.attn1.to_q",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.5.1.proj_out": "up_blocks.1.attentions.2.proj_out",
    "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}


def test_sd15_known_pairs(sd15):
    _, names = sd15
    assert {k: names.get(k) for k in SD15_PAIRS} == SD15_PAIRS


def test_sdxl_known_pairs(sdxl):
    unet, names = sdxl
    assert {k: names.get(k) for k in SDXL_PAIRS} == SDXL_PAIRS
    assert not any(v.startswith(("up_blocks.2.attentions", "down_blocks.0.attentions")) for v in names.values())
    assert not any(".upsamplers." in v and v.startswith("up_blocks.2") for v in names.values())  # last level: none


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_map_is_injective_and_covers_every_layer(which, request):
    unet, names = request.getfixturevalue(which)
    assert len(set(names.values())) == len(names)
    kohya = {E.kohya_name(v) for v in names.values()}
    assert len(kohya) == len(names)  # '.' -> '_' loses nothing
    with_params = [n for n, m in unet.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert with_params and [n for n in with_params if n not in names] == []
    # diffusers shape: 4 down levels x 2 resnets for SD1.5, 3 resnets per up level
    assert len({v.rsplit(".",
                         1)[0] for v in names.values() if v.startswith("up_blocks.") and v.endswith(".conv1")}) == \
        3 * len(unet.config["channel_mult"])


UNEVEN_CONFIG = dict(model_channels=32, num_res_blocks=[1, 2, 1], channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                     transformer_depth_middle=0, context_dim=64, num_heads=2)


def test_uneven_tiny_layout():
    """Per-level res-block counts, a level without attention, a middle block without one."""
    unet, names = meta_names(UNEVEN_CONFIG)
    assert names["input_blocks.2.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["input_blocks.4.1.proj_in"] == "down_blocks.1.attentions.1.proj_in"
    assert names["input_blocks.5.0.op"] == "down_blocks.1.downsamplers.0.conv"
    assert (names["input_blocks.6.1.transformer_blocks.1.attn1.to_q"]
            == "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q")
    assert names["middle_block.1.in_layers.2"] == "mid_block.resnets.1.conv1"
    assert names["output_blocks.1.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert names["output_blocks.4.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert names["output_blocks.6.0.in_layers.2"] == "up_blocks.2.resnets.1.conv1"
    assert len(set(names.values())) == len(names)


def test_partial_names_raise_instead_of_guessing(sd15):
    unet, _ = sd15
    only_attn = [n for n, _ in unet.named_modules() if n.endswith("to_q")]
    with pytest.raises(ValueError, match="named_modules"):
        ldm_to_diffusers(only_attn)


def tiny_lora_unet(preset="full", seed=0):
    torch.manual_seed(seed)
    unet = UNet(**TINY_CONFIG)
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:  # zero-init output convs would hide LoRA effects
                p.normal_(0, 0.02)
    inject_lora(unet, LoraSpec(rank=4, alpha=8, preset=preset))
    with torch.no_grad():
        for layer in lora_layers(unet).values():  # B = 0 at init: give the LoRA a real delta
            layer.lora_B["default"].weight.normal_(0, 0.1)
            layer.lora_A["default"].weight.normal_(0, 0.1)
    return unet


def test_kohya_keys_for_tiny_unet():
    unet = tiny_lora_unet()
    names = ldm_to_diffusers(n for n, _ in unet.named_modules())  # peft wrappers in the tree are ignored
    assert not any("lora_" in v or "base_layer" in v for v in names.values())
    sd = E.to_kohya(lora_weights(unet), names)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{k}.lora_down.weight"].shape == (4, 32) and sd[f"{k}.lora_up.weight"].shape == (32, 4)
    assert sd[f"{k}.alpha"].ndim == 0 and sd[f"{k}.alpha"].dtype == torch.float32 and float(sd[f"{k}.alpha"]) == 8.0
    # output_blocks.3.0.in_layers.2: 3x3 conv, 32 + 32 skip -> 32 channels
    conv = "lora_unet_up_blocks_1_resnets_1_conv1"
    assert sd[f"{conv}.lora_down.weight"].shape == (4, 64, 3, 3) and sd[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert len(sd) == 3 * len(lora_layers(unet))
    assert all(t.is_contiguous() and t.device.type == "cpu" and not t.requires_grad for t in sd.values())
    half = E.to_kohya(lora_weights(unet), names, dtype=torch.float16)
    assert half[f"{k}.lora_down.weight"].dtype == torch.float16 and half[f"{k}.alpha"].dtype == torch.float32
    with pytest.raises(ValueError, match="named_modules"):
        E.to_kohya(lora_weights(unet), {})


def test_round_trip_bit_exact_and_delta_reproduces_adapter(tmp_path):
    unet = tiny_lora_unet()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 5, 64)
    with torch.no_grad():
        adapted = unet(x, t, ctx)
    weights = lora_weights(unet)
    names = ldm_to_diffusers(n for n, _ in unet.named_modules())
    path = E.save_lora(tmp_path / "a.safetensors", E.to_kohya(weights, names), {"cat_factor": "1.0"})
    tensors, meta = E.load_lora(path)
    assert meta == {"cat_factor": "1.0"}
    back = E.from_kohya(tensors, names)
    assert back.keys() == weights.keys()
    for p, w in weights.items():
        assert torch.equal(back[p].down, w.down) and torch.equal(back[p].up, w.up) and back[p].alpha == w.alpha, p
    remove_lora(unet)
    with torch.no_grad():
        base = unet(x, t, ctx)
        for p, w in back.items():
            layer = unet.get_submodule(p)
            layer.weight += w.delta().reshape(layer.weight.shape)  # the stock loaders' rule W + alpha/rank up@down
        merged = unet(x, t, ctx)
    assert (adapted - base).abs().max() > 1e-2  # the LoRA does something
    assert (merged - adapted).abs().max() < 1e-5


def test_from_kohya_errors_and_missing_alpha():
    unet = tiny_lora_unet(preset="attn")
    names = ldm_to_diffusers(n for n, _ in unet.named_modules())
    sd = E.to_kohya(lora_weights(unet), names)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    no_alpha = {key: v for key, v in sd.items() if key != f"{k}.alpha"}
    w = E.from_kohya(no_alpha, names)["middle_block.1.transformer_blocks.0.attn2.to_v"]
    assert w.alpha == 4.0  # = rank: scale 1, as kohya and ComfyUI read a missing alpha
    with pytest.raises(ValueError, match="text-encoder"):
        E.from_kohya({**sd, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, names)
    with pytest.raises(ValueError, match="name no module"):
        E.from_kohya({**sd, "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 4)}, names)
    with pytest.raises(ValueError, match="lacks its lora_up"):
        E.from_kohya({key: v for key, v in sd.items() if key != f"{k}.lora_up.weight"}, names)


def test_overwrite_refused_then_allowed(tmp_path):
    p = tmp_path / "x.safetensors"
    E.save_lora(p, {"a": torch.ones(2)}, {})
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        E.save_lora(p, {"a": torch.zeros(2)}, {})
    assert str(p) in str(err.value)
    assert torch.equal(E.load_lora(p)[0]["a"], torch.ones(2))  # untouched
    E.save_lora(p, {"a": torch.zeros(2)}, {}, overwrite=True)
    assert torch.equal(E.load_lora(p)[0]["a"], torch.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]  # no temp file left behind


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(E.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        E.save_lora(tmp_path / "y.safetensors", {"a": torch.ones(2)}, {})
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="json.dumps"):
        E.save_lora(tmp_path / "z.safetensors", {"a": torch.ones(2)}, {"steps": 600})


def test_next_free_path(tmp_path):
    assert E.next_free_path(tmp_path / "none", "cat").name == "cat_00001.safetensors"
    for n in ("cat_00001.safetensors", "cat_00003.safetensors", "catty_00009.safetensors"):
        (tmp_path / n).write_bytes(b"")
    assert E.next_free_path(tmp_path, "cat") == tmp_path / "cat_00004.safetensors"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        E.load_lora(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors.*not a readable"):
        E.load_lora(bad)


def test_training_metadata(tmp_path):
    meta = E.training_metadata(cat_factor=1, triggers=["sks"], preservation="class", class_word="dog", steps=600,
                               rank=16, alpha=16, lr=1e-4, seed=3, num_images=5, resolution=512,
                               target_preset="attn", base_model="v1-5.safetensors", base_model_version="sd_v1",
                               output_name="dog", captions=["sks, dog, grass", "sks, dog"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["cat_factor"] == "1.0" and json.loads(meta["cat_triggers"]) == ["sks"]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "16"
    assert meta["ss_resolution"] == "(512, 512)" and meta["ss_max_train_steps"] == "600"
    assert json.loads(meta["ss_tag_frequency"]) == {"cat": {"sks": 2, "dog": 2, "grass": 1}}
    # what the function derives rather than echoes: the cat_version from the package, cat_steps from the steps
    # actually done, a (w, h) resolution, triggers from any iterable, text defaults, extra keys winning
    from cat_train import __version__
    assert meta["cat_version"] == __version__ and meta["cat_steps"] == "600" and meta["ss_training_comment"] == ""
    stopped = E.training_metadata(cat_factor=0.5, triggers=(t for t in ("sks", "zwx")), preservation="strip", steps=600,
                                  rank=8, alpha=4.0, lr=1e-4, resolution=(768, 512), steps_done=250,
                                  extra={"ss_training_comment": "cancelled", "cat_custom": "x"})
    assert stopped["cat_steps"] == "250" and stopped["ss_max_train_steps"] == "600"  # a cancelled run says so
    assert stopped["ss_resolution"] == "(768, 512)" and json.loads(stopped["cat_triggers"]) == ["sks", "zwx"]
    assert stopped["cat_factor"] == "0.5" and stopped["ss_network_alpha"] == "4.0" and stopped["ss_network_dim"] == "8"
    assert stopped["ss_training_comment"] == "cancelled" and stopped["cat_custom"] == "x"
    assert json.loads(stopped["ss_tag_frequency"]) == {"cat": {}} and stopped["cat_class_word"] == ""
    p = E.save_lora(tmp_path / "m.safetensors", {"a": torch.ones(1)}, meta)
    assert E.load_lora(p)[1] == meta


# ComfyUI numbers blocks as (num_res_blocks + 1) * level, right only when every level has the same count,
# so UNEVEN_CONFIG cannot be checked against it; this one varies the transformer depths instead.
MIXED_DEPTH_CONFIG = dict(model_channels=32, num_res_blocks=2, channel_mult=(1, 2, 2), transformer_depth=(0, 2, 1),
                          transformer_depth_middle=3, context_dim=64, num_heads=2)


def _comfy_config(unet):
    c = unet.config
    levels = range(len(c["channel_mult"]))
    return dict(num_res_blocks=c["num_res_blocks"], channel_mult=c["channel_mult"],
                transformer_depth=[c["transformer_depth"][lv] for lv in levels for _ in range(c["num_res_blocks"][lv])],
                transformer_depth_output=[c["transformer_depth"][lv] for lv in levels
                                          for _ in range(c["num_res_blocks"][lv] + 1)],
                transformer_depth_middle=c["transformer_depth_middle"])


def _import_comfy():
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to compare against")
    if root not in sys.path:  # first, as tests/comfy/conftest.py puts it: ComfyUI's nodes.py before this pack's nodes/
        sys.path.insert(0, root)
    # tiny_models: tiny SD1.x/SDXL from ComfyUI's classes
    helpers = os.path.join(os.path.dirname(os.path.dirname(__file__)), "comfy")
    if helpers not in sys.path:
        sys.path.append(helpers)
    import comfy.options
    comfy.options.enable_args_parsing(False)  # pytest's argv is not ComfyUI's
    from comfy.cli_args import args
    args.cpu = True
    import comfy.lora
    import comfy.utils
    return comfy


@pytest.mark.comfyui
@pytest.mark.parametrize("config", [SD15_CONFIG, SDXL_CONFIG, TINY_CONFIG, MIXED_DEPTH_CONFIG],
                         ids=["sd15", "sdxl", "tiny", "mixed"])
def test_matches_comfyui_unet_to_diffusers(config):
    comfy = _import_comfy()
    unet, names = meta_names(config)
    modules = {n for n, _ in unet.named_modules()}
    mapped = comfy.utils.unet_to_diffusers(_comfy_config(unet)).items()
    theirs = {v[: -len(".weight")]: k[: -len(".weight")] for k, v in mapped
              if k.endswith(".weight") and v[: -len(".weight")] in modules and not k.startswith("class_embedding")}
    assert len(theirs) > 100
    assert {p: names.get(p) for p in theirs} == theirs


@pytest.mark.comfyui
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfyui_lora_key_map_resolves_every_key(kind):
    """On ComfyUI's own UNet classes, each kohya key we write is one ComfyUI's LoRA loader patches, at the same
    weight."""
    comfy = _import_comfy()
    from tiny_models import tiny_model

    mp = tiny_model(kind)[0]
    unet = mp.model.diffusion_model
    names = ldm_to_diffusers(n for n, _ in unet.named_modules())
    from cat_train.adapters.lora import target_modules
    paths = target_modules(unet, LoraSpec(preset="full"))
    keymap = comfy.lora.model_lora_keys_unet(mp.model, {})
    assert len(paths) > 50
    assert {p: keymap.get(E.kohya_name(names[p])) for p in paths} == {p: f"diffusion_model.{p}.weight" for p in paths}
