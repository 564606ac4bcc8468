"""The README's main-job command, end to end on a few steps."""
import json

from safetensors import safe_open

from cat_train.__main__ import main


# The fewest steps at which plain LoRA already leaks on this world (80: leak 0.83, identity 0.50; 50: no leak yet),
# so the test sees the demo's point, not just its files: ~40 s on one busy core.
STEPS = 80


def test_demo_writes_grid_table_loras_curve_and_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", str(STEPS)]) == 0
    out = capsys.readouterr().out
    assert "NOT Stable Diffusion" in out and "| LoRA (α=0) |" in out and "| CAT (α=1) |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["runs"]) == {"lora", "cat"} and report["steps"] == STEPS
    base, lora, cat = report["base"], report["runs"]["lora"], report["runs"]["cat"]
    assert base["leak"] == 0 and base["identity"] == 0 and base["drift"] == 0  # the base never saw the identity
    assert lora["identity"] > 0 and lora["leak"] >= 0.5  # plain LoRA learned the subject and turned plain circles into it
    assert cat["leak"] == 0 and cat["KPS"] > lora["KPS"] + 0.02  # CAT: same steps, no leak, images with/without differ
    assert 0.05 < cat["drift"] < lora["drift"] - 0.05  # CAT moved the tokenless circles, by less than LoRA did
    for name, run in report["runs"].items():
        assert run["final_fit"] > 0
        with safe_open(str(tmp_path / f"demo_{name}.safetensors"), "pt") as f:
            assert float(f.metadata()["cat_factor"]) == run["alpha"]
            assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k") for k in f.keys())
    for f in ("loss_curve.png", "kps_grid.png"):
        assert (tmp_path / f).stat().st_size > 1000
    rows = [r for r in (tmp_path / "kps_table.md").read_text().splitlines() if r.startswith("| ") and not r.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["base (no adapter)", "LoRA (α=0)", "CAT (α=1)"]
    before = (tmp_path / "demo_cat.safetensors").read_bytes()
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0  # a second run never overwrites a LoRA
    assert (tmp_path / "demo_cat.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "report.json").read_text())["runs"]["cat"]["lora"].endswith("demo_cat_00001.safetensors")


def test_unknown_command_exits_2(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().out
