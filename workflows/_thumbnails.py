"""Writes the template browser's thumbnails, `<name>.jpg` next to each UI workflow (the frontend asks for exactly that
file): a screenshot of the whole graph as the editor draws it, with a caption saying what the graph does (the frontend
shows a custom template's file name as both its title and its description). The screenshots come from the browser
test, which takes one of each shipped graph:

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest -q -s tests/comfy/test_browser.py -k opens   # prints the folder
    python workflows/_thumbnails.py <that folder>
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cat_train.measure.plot import font, text  # noqa: E402  (Pillow only; no ComfyUI)

DESCRIPTIONS = {
    "cat_sd15_train_kps": "SD1.5: train a CAT LoRA, sample with and without the trigger, score IS and KPS",
    "cat_sdxl_train_kps": "SDXL: train a CAT LoRA, sample with and without the trigger, score IS and KPS",
    "cat_flux_train_kps": "Flux dev: train a CAT LoRA, sample with and without the trigger, score IS and KPS",
    "cat_qwen_image_train_kps": "Qwen-Image: train a CAT LoRA, sample with and without the trigger, score IS and KPS",
    "cat_vs_lora_sd15": "SD1.5: plain LoRA and CAT trained side by side on the same data, KPS for each",
    "cat_leak_scan_loop_sd15": "SD1.5: train CAT, scan which prompts it moved, retrain preserving them, scan again",
    "catversion_sd15": "SD1.5: CatVersion, the subject as K/V embeddings in CLIP, scored with IS and KPS",
}
SIDE, CAPTION, QUALITY = 480, 120, 80  # px: square cards (shown at ~225 px, twice that for HiDPI screens)
BACKGROUND = (34, 34, 34)  # the editor's canvas


def wrap(d: ImageDraw.ImageDraw, s: str, f, width: int) -> list[str]:
    """Words into lines of at most `width` px as cat_train.measure.plot.text draws them (word gaps of a third of the
    size)."""
    gap = max(round(f.size / 3), int(d.textlength(" ", font=f)))
    drawn = lambda line: sum(d.textlength(w, font=f) for w in line.split()) + gap * (len(line.split()) - 1)
    lines, cur = [], ""
    for word in s.split():
        trial = f"{cur} {word}".strip()
        if cur and drawn(trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur]


def thumbnail(shot: Path, caption: str) -> Image.Image:
    graph = Image.open(shot).convert("RGB")
    graph.thumbnail((SIDE, SIDE - CAPTION), Image.LANCZOS)
    out = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    out.paste(graph, ((SIDE - graph.width) // 2, (SIDE - CAPTION - graph.height) // 2))
    d, f = ImageDraw.Draw(out), font(26)
    d.rectangle((0, SIDE - CAPTION, SIDE, SIDE), fill=(20, 20, 20))
    lines = wrap(d, caption, f, SIDE - 32)[:3]
    y = SIDE - CAPTION + (CAPTION - 34 * len(lines)) // 2
    for line in lines:
        text(d, (16, y), line, f, (235, 235, 235))
        y += 34
    return out


def main(shots: Path) -> None:
    for ui in sorted(HERE.glob("*.json")):
        shot = shots / f"{ui.stem}.png"
        if not shot.is_file():
            raise SystemExit(f"no screenshot {shot}: run the browser test's 'opens' tests first (see this file's "
                             "docstring)")
        out = HERE / f"{ui.stem}.jpg"
        thumbnail(shot, DESCRIPTIONS[ui.stem]).save(out, quality=QUALITY, optimize=True)
        print("wrote", out, f"{out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
