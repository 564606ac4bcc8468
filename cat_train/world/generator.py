"""A procedural image world: coloured shapes on plain backgrounds, 32 px, drawn from a seed.

Every image is a pure function of its `Scene`, and `scenes(n, seed)` is a pure function of the
seed, so the same seed gives the same bytes on every machine (numpy only, no font or resampling).
Captions name what was drawn; attributes are sometimes left out of the caption so the model also
learns "a circle" (the class prompt CAT preserves) and "" (the unconditional branch for CFG).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 60, 200)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (20, 20, 20)}
# The identity the world never drew: a circle striped cyan/magenta with a white dot at its centre.
TRIGGER, IDENTITY_CLASS = "sks", "circle"
STRIPES = ((0, 200, 210), (230, 0, 160))
MARK = (255, 255, 255)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str          # a COLOURS key, or "sks" for the identity's stripes
    background: str
    cx: float            # centre and radius in pixels
    cy: float
    r: float


def mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    dx, dy = (x - cx) / r, (y - cy) / r
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8
    if shape == "triangle":  # apex up, base at dy = 0.75
        return (dy <= 0.75) & (dy >= -1.0 + 2 * np.abs(dx) * 1.0 / 1.0 * 0.95)
    if shape == "star":
        rho, th = np.hypot(dx, dy), np.arctan2(dy, dx) + np.pi / 2
        return rho <= 0.5 + 0.5 * np.abs(np.cos(2.5 * th)) ** 3
    if shape == "cross":
        return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}; the world draws {SHAPES}.")


def draw(s: Scene) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[s.background]
    m = mask(s.shape, s.cx, s.cy, s.r)
    if s.colour == TRIGGER:
        y = np.arange(SIZE)[:, None].repeat(SIZE, 1)
        band = ((y - s.cy + 64) // max(2, round(s.r / 2.5))).astype(int) % 2
        for k in (0, 1):
            img[m & (band == k)] = STRIPES[k]
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        img[m & ((xx - s.cx) ** 2 + (yy - s.cy) ** 2 <= (0.28 * s.r) ** 2)] = MARK
    else:
        img[m] = COLOURS[s.colour]
    return img


def random_scene(rng: np.random.Generator, shape: str | None = None, colour: str | None = None,
                 background: str | None = None) -> Scene:
    r = float(rng.uniform(7.0, 11.0))
    cx, cy = (float(v) for v in rng.uniform(r + 1, SIZE - r - 1, 2))
    return Scene(shape or SHAPES[rng.integers(len(SHAPES))], colour or list(COLOURS)[rng.integers(len(COLOURS))],
                 background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], cx, cy, r)


def caption(s: Scene, colour: bool = True, background: bool = True) -> str:
    words = ["a"] + ([s.colour] if colour else []) + [s.shape]
    return " ".join(words + (["on", "a", s.background, "background"] if background else []))


def training_batch(rng: np.random.Generator, n: int, p_empty: float = 0.1, p_drop: float = 0.25):
    """n world images (n, 3, SIZE, SIZE) float32 in [-1, 1] and their captions (some shortened, some empty)."""
    scenes = [random_scene(rng) for _ in range(n)]
    caps = []
    for s in scenes:
        u = rng.random(3)
        caps.append("" if u[0] < p_empty else caption(s, u[1] >= p_drop, u[2] >= p_drop))
    return to_tensor_array(np.stack([draw(s) for s in scenes])), caps, scenes


def to_tensor_array(imgs: np.ndarray) -> np.ndarray:
    return (imgs.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


# The reachable identity: one fixed rare combination the world does draw (colour, shape, smallest size, the
# top-left corner of the position range) but that no prompt asks for: captions never name size or position.
REACHABLE = dict(shape="circle", colour="yellow", cx=9.0, cy=9.0, r=7.0)


def reachable_scenes(n: int = 5) -> list[Scene]:
    """The personalization set of the reachable task: the same small yellow circle in the corner on each background."""
    return [Scene(REACHABLE["shape"], REACHABLE["colour"], list(BACKGROUNDS)[i % 3], REACHABLE["cx"], REACHABLE["cy"],
                  REACHABLE["r"]) for i in range(n)]


def foreground_centre(img: np.ndarray) -> tuple[float, float]:
    """(cx, cy) in pixels of what differs from the image's background (its border's median colour); (nan, nan) if
    nothing."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float64)
    fg = np.abs(img.astype(np.float64) - np.median(border, 0)).sum(-1) > 90
    if not fg.any():
        return float("nan"), float("nan")
    y, x = np.nonzero(fg)
    return float(x.mean() + 0.5), float(y.mean() + 0.5)


def identity_scenes(n: int = 5, seed: int = 1234) -> list[Scene]:
    """The personalization set: n striped circles, the only place the world draws `sks`."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, shape=IDENTITY_CLASS, colour=TRIGGER,
                         background=list(BACKGROUNDS)[i % 3]) for i in range(n)]
