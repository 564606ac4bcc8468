"""The README's main-job command, end to end on a few steps."""
import json

from safetensors import safe_open

from cat_train.__main__ import main
from cat_train.measure.validation import read_validation_csv


# The fewest steps at which plain LoRA already leaks on this world (80: leak 0.83, identity 0.50; 50: no leak yet),
# so the test sees the demo's point, not just its files: ~40 s on one busy core.
STEPS = 80


def test_demo_writes_grid_table_loras_curve_and_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", str(STEPS), "--save-every", "40", "--validate-every",
                 "20"]) == 0
    out = capsys.readouterr().out
    assert "NOT Stable Diffusion" in out and "| LoRA (α=0) |" in out and "| CAT (α=1) |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["runs"]) == {"lora", "cat"} and report["steps"] == STEPS
    base, lora, cat = report["base"], report["runs"]["lora"], report["runs"]["cat"]
    assert base["leak"] == 0 and base["identity"] == 0 and base["drift"] == 0  # the base never saw the identity
    # plain LoRA learned the subject and turned plain circles into it
    assert lora["identity"] > 0 and lora["leak"] >= 0.5
    assert cat["leak"] == 0 and cat["KPS"] > lora["KPS"] + 0.02  # CAT: same steps, no leak, images with/without differ
    assert 0.05 < cat["drift"] < lora["drift"] - 0.05  # CAT moved the tokenless circles, by less than LoRA did
    for name, run in report["runs"].items():
        assert run["final_fit"] > 0
        with safe_open(str(tmp_path / f"demo_{name}.safetensors"), "pt") as f:
            assert float(f.metadata()["cat_factor"]) == run["cat_factor"]
            assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k")
                       for k in f.keys())
    for f in ("loss_curve.png", "kps_grid.png"):
        assert (tmp_path / f).stat().st_size > 1000
    rows = [r for r in (tmp_path / "kps_table.md").read_text().splitlines()
            if r.startswith("| ") and not r.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["base (no adapter)", "LoRA (α=0)", "CAT (α=1)"]
    # measured while training: a preview grid per saved step, validation curves, per-step scores, the best step
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == \
        ["cat_step000040.png", "cat_step000080.png", "lora_step000040.png", "lora_step000080.png"]
    from PIL import Image
    from cat_train.measure.preview import HEADER, LABEL_W, PAD
    assert Image.open(tmp_path / "previews" / "cat_step000080.png").size == \
        (LABEL_W + 4 * (96 + PAD) + PAD, HEADER + 3 * (96 + PAD) + PAD)  # 4 prompts; rows base, 40, 80 at 3x of 32 px
    rows = read_validation_csv(tmp_path / "validation.csv")
    for run in ("lora", "cat"):
        got = [r for r in rows if r["run"] == run]
        assert [r["step"] for r in got] == [0, 20, 40, 60, 80]
        assert got[0]["keep_drift"] == 0.0 and got[-1]["keep_drift"] > 0 and got[-1]["fit"] < got[0]["fit"]
        assert set(got[0]) == {"run", "step", "fit", "keep_drift", "probe_drift"}
        table = report["per_step"][run]
        assert [r["step"] for r in table] == [40, 80] and all(0 <= r["IS"] <= 1 and 0 <= r["KPS"] <= 1 for r in table)
        final = report["runs"][run]
        # same noise, same adapter
        assert all(table[-1][k] == final[k] for k in ("IS", "KPS", "identity", "leak", "drift"))
        assert table[-1]["keep_drift"] == got[-1]["keep_drift"]
        best = report["best_step"][run]
        assert best["step"] in (40, 80) and best["final"]["step"] == STEPS and best["reason"]
    cat_drift = [r["keep_drift"] for r in rows if r["run"] == "cat"][1:]
    lora_drift = [r["keep_drift"] for r in rows if r["run"] == "lora"][1:]
    assert all(c < l for c, l in zip(cat_drift, lora_drift))  # CAT keeps the tokenless predictions closer, at every row
    for b in report["best_step"].values():  # the flag tells whether the picked step met the bound
        assert b["within_bound"] == (b["keep_drift"] <= b["rule"]["max_keep_drift"])
    # plain LoRA drifts past the demo's bound from the first rows
    assert not report["best_step"]["lora"]["within_bound"]
    assert "best step cat:" in out and "per saved step" in out

    before = (tmp_path / "demo_cat.safetensors").read_bytes()
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0  # a second run never overwrites a LoRA
    assert (tmp_path / "demo_cat.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "report.json").read_text())["runs"]["cat"]["lora"].endswith(
            "demo_cat_00001.safetensors")


def test_unknown_command_exits_2(capsys):
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().out
