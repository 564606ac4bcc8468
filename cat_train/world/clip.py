"""World-CLIP: an image and a text encoder trained contrastively on the world, plus exact attribute heads.

It plays CLIP's role in the paper's PS / IS / KPS (cosine similarities of its embeddings) and adds
class and colour classifiers for tokenless generations. Its training set also has striped objects
("a striped circle"), so, like real CLIP, it can tell the identity's pattern from a plain colour
although the diffusion model never saw one. `python -m cat_train.world.clip` retrains it from the seed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .generator import BACKGROUNDS, COLOURS, SHAPES, TRIGGER, caption, draw, random_scene, to_tensor_array

CLIP_WEIGHTS = Path(__file__).resolve().parent / "clip.safetensors"
COLOUR_CLASSES = (*COLOURS, "striped")
WORDS = ("<pad>", "<unk>", "a", "on", "background", *SHAPES, *COLOURS, "striped", *BACKGROUNDS)
EMB, LENGTH = 64, 8


def text_ids(prompts: list[str]) -> Tensor:
    rows = []
    for p in prompts:
        ids = [WORDS.index(w) if w in WORDS else 1 for w in p.lower().split()[:LENGTH]]
        rows.append(ids + [0] * (LENGTH - len(ids)))
    return torch.tensor(rows)


class WorldClip(nn.Module):
    def __init__(self):
        super().__init__()
        c = lambda i, o, s: [nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.SiLU()]
        self.trunk = nn.Sequential(*c(3, 32, 1), *c(32, 64, 2), *c(64, 128, 2), *c(128, 128, 2),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.img_proj = nn.Linear(128, EMB)
        self.shape_head, self.colour_head = nn.Linear(128, len(SHAPES)), nn.Linear(128, len(COLOUR_CLASSES))
        self.tok = nn.Embedding(len(WORDS), 64)
        self.txt = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, EMB))
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # ln(1/0.07), CLIP's start

    def image_features(self, img: Tensor) -> Tensor:
        return self.trunk(img)

    def encode_image(self, img: Tensor) -> Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, EMB), not normalized (metrics.cosine normalizes)."""
        return self.img_proj(self.trunk(img))

    def encode_text(self, prompts: list[str]) -> Tensor:
        ids = text_ids(prompts).to(self.tok.weight.device)
        mask = (ids > 0).float().unsqueeze(-1)
        return self.txt((self.tok(ids) * mask).sum(1) / mask.sum(1).clamp(min=1))

    @torch.no_grad()
    def attributes(self, img: Tensor) -> tuple[list[str], list[str]]:
        """Predicted shape and colour ('striped' for the identity's pattern) of each image."""
        f = self.trunk(img)
        return ([SHAPES[i] for i in self.shape_head(f).argmax(-1)],
                [COLOUR_CLASSES[i] for i in self.colour_head(f).argmax(-1)])


def load_clip(path: str | Path = CLIP_WEIGHTS) -> WorldClip:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m cat_train.world.clip`.")
    m = WorldClip()
    m.load_state_dict(load_file(str(path)))
    return m.eval().requires_grad_(False)


def _batch(rng: np.random.Generator, n: int):
    scenes, caps = [], []
    for _ in range(n):
        striped = rng.random() < 0.15
        s = random_scene(rng, colour=TRIGGER if striped else None)
        scenes.append(s)
        u = rng.random(2)
        cap = caption(s, True, u[1] >= 0.3) if u[0] >= 0.2 else caption(s, False, u[1] >= 0.3)
        caps.append(cap.replace(f" {TRIGGER} ", " striped "))
    img = torch.from_numpy(to_tensor_array(np.stack([draw(s) for s in scenes])))
    # generated images are noisy and soft: train on noisy, sometimes blurred copies
    sig = torch.from_numpy(rng.uniform(0, 0.25, (n, 1, 1, 1)).astype(np.float32))
    blur = torch.from_numpy(rng.random((n, 1, 1, 1)) < 0.3)
    img = torch.where(blur, F.avg_pool2d(img, 3, 1, 1, count_include_pad=False), img)
    img = img + sig * torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32))
    shape = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    colour = torch.tensor([COLOUR_CLASSES.index("striped" if s.colour == TRIGGER else s.colour) for s in scenes])
    return img, caps, shape, colour


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train.world.clip")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(CLIP_WEIGHTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng, m = np.random.default_rng(a.seed + 1), WorldClip()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=a.steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        img, caps, shape, colour = _batch(rng, a.batch)
        f = m.trunk(img)
        zi, zt = F.normalize(m.img_proj(f), dim=-1), F.normalize(m.encode_text(caps), dim=-1)
        logits = zi @ zt.T * m.logit_scale.exp().clamp(max=100)
        # captions repeat inside a batch: every image whose caption matches is a positive
        same = torch.tensor([[ci == cj for cj in caps] for ci in caps], dtype=torch.float32)
        tgt = same / same.sum(1, keepdim=True)
        contrast = 0.5 * (-(tgt * logits.log_softmax(1)).sum(1).mean() - (tgt * logits.T.log_softmax(1)).sum(1).mean())
        loss = contrast + F.cross_entropy(m.shape_head(f), shape) + F.cross_entropy(m.colour_head(f), colour)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps:
            with torch.no_grad():
                acc_s = (m.shape_head(f).argmax(-1) == shape).float().mean()
                acc_c = (m.colour_head(f).argmax(-1) == colour).float().mean()
            print(f"step {step} loss {float(loss.detach()):.3f} shape acc {acc_s:.3f} colour acc {acc_c:.3f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, a.out,
              metadata={"seed": str(a.seed), "steps": str(a.steps)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
