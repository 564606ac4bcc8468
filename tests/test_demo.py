"""The README's main-job command, end to end on a few steps."""
import json

from safetensors import safe_open

from cat_train.__main__ import main


def test_demo_writes_loras_curve_and_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "Not Stable Diffusion" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["runs"]) == {"lora", "cat"} and report["steps"] == 3
    for name, run in report["runs"].items():
        assert run["drift_without_trigger"] > 0 and run["final_fit"] > 0
        with safe_open(str(tmp_path / f"demo_{name}.safetensors"), "pt") as f:
            assert float(f.metadata()["cat_factor"]) == run["alpha"]
            assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k") for k in f.keys())
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    before = (tmp_path / "demo_cat.safetensors").read_bytes()
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0  # a second run never overwrites a LoRA
    assert (tmp_path / "demo_cat.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "report.json").read_text())["runs"]["cat"]["lora"].endswith("demo_cat_00001.safetensors")


def test_unknown_command_exits_2(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().out
