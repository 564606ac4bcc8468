"""The bench's method names: `lora`, `prior`, `cat<alpha>[:mode]`, APT's `+apt[:part]`, cheaper preservation's
`/k<every>/p<fraction>/local[:unit|relative]` and `catversion[...]`, parsed, labelled and checked as command-line
arguments."""
from __future__ import annotations

import argparse
import math

from ..terms.apt_config import AptConfig
from ..terms.keep_local import LocalKeepSettings
from .catversion_bench import catversion_alpha, catversion_label

LABELS = {"base": "base (no adapter)", "lora": "LoRA (α=0)", "prior": "DreamBooth prior (α=0)"}


def cat_method(m: str) -> tuple[float, str]:
    """'cat1' -> (1.0, 'class'); 'cat1:empty' -> (1.0, 'empty'): CAT factor and preservation mode.

    Modes: class, strip, empty (CatLossConfig's), all: y cycles over every class of the world, and auto: y starts
    as the class prompt and auto preservation adds the other classes it finds drifting (cat_train/terms/auto.py);
    nearest: as auto, with no list: the probes are the words nearest to the class word (cat_train/terms/nearest.py).
    """
    alpha, _, mode = m[3:].partition(":")
    return float(alpha), mode or "class"


ALL3 = ("adaptive", "stabilize", "align")
APT_PARTS = {"": ALL3, "ada": ("adaptive",), "rs": ("stabilize",), "aa": ("align",), "skip": ALL3, "earlier": ALL3}
APT_NAMES = {"": "APT", "ada": "APT adaptive only", "rs": "APT stabilization only", "aa": "APT attention only",
             "skip": "APT, triggers not aligned", "earlier": "APT (earlier choices)"}


def apt_method(m: str) -> tuple[str, str | None]:
    """'apt' -> ('lora', ''); 'cat1+apt:rs' -> ('cat1', 'rs'); 'cat1' -> ('cat1', None): base method, APT part."""
    base, plus, apt = m.partition("+")
    if not plus and base.startswith("apt"):
        base, apt = "lora", base
    if not apt:
        return base, None
    if not apt.startswith("apt"):
        raise ValueError(f"unknown APT part in {m!r}")
    return base, apt[3:].lstrip(":")


def apt_config(part: str, c) -> AptConfig:
    """c: the BenchConfig whose APT weights the apt methods use."""
    if part not in APT_PARTS:
        raise ValueError(f"unknown APT part {part!r}; choose from apt, apt:ada, apt:rs, apt:aa")
    on = APT_PARTS[part]
    weights = dict(adaptive=c.apt_adaptive if "adaptive" in on else 0.0,
                   stabilize=c.apt_stabilize if "stabilize" in on else 0.0,
                   align=c.apt_align if "align" in on else 0.0, align_skip_triggers=part == "skip")
    return AptConfig.earlier(**weights) if part == "earlier" else AptConfig(**weights)


def cheaper_method(m: str) -> tuple[str, int, float]:
    """'cat1/k4/p0.5' -> ('cat1', 4, 0.5): the base method and its cheaper preservation (keep_every, keep_fraction)."""
    base, every, fraction, _ = cheaper_options(m)
    return base, every, fraction


def cheaper_options(m: str) -> tuple[str, int, float, dict]:
    """'cat1/k4/local' -> ('cat1', 4, 1.0, {"keep_estimator": "local"}): cheaper_method's parts and the keep
    estimator (`/local`: the default layer weights, `/local:unit` or `/local:relative` to name them;
    cat_train/terms/keep_local.py), as CatLossConfig fields."""
    base, *opts = m.split("/")
    every, fraction, estimator = 1, 1.0, {}
    for o in opts:
        if o[:1] == "k" and o[1:].isdigit() and int(o[1:]) >= 1:
            every = int(o[1:])
        elif o[:1] == "p":
            fraction = float(o[1:])
        elif o in ("local", "local:relative", "local:unit"):
            estimator = {"keep_estimator": "local", **({"keep_local_weights": o[6:]} if ":" in o else {})}
        else:
            raise ValueError(f"unknown cheaper-preservation part {o!r} in {m!r}; use /k<every>, /p<fraction> and "
                             "/local[:unit|relative], e.g. cat1/k4, cat1/local")
    return base, every, fraction, estimator


def label(m: str) -> str:
    if "/" in m:
        base, every, fraction, local = cheaper_options(m)
        weights = local.get("keep_local_weights", LocalKeepSettings.weights)
        return label(base) + (f", term every {every} steps" if every > 1 else "") + \
            (f", on {fraction:g} of rows" if fraction < 1 else "") + (f", local keep ({weights} w_l)" if local else "")
    if m.startswith("catversion"):
        return catversion_label(m)
    base, part = apt_method(m)
    if part is not None:
        return APT_NAMES[part] + " (α=0)" if base == "lora" else label(base) + " + " + APT_NAMES[part]
    if m in LABELS:
        return LABELS[m]
    alpha, mode = cat_method(m)
    return f"CAT (α={alpha:g})" if mode == "class" else (f"CAT (α={alpha:g}, "
                                                         f"y={'all classes' if mode == 'all' else mode})")


def method_name(m: str) -> str:
    """argparse type of --methods: lora, prior or cat<alpha>[:class|strip|empty|all], each optionally
    +apt[:ada|rs|aa|skip|earlier]; apt[:part]; catversion[:earlier][+cat<alpha>]."""
    if "/" in m:  # cat<alpha>[...]/k<every>/p<fraction>: cheaper preservation of a CAT method
        try:
            base, every, fraction = cheaper_method(m)
            cat = method_name(base).startswith("cat") and not base.startswith("catversion")
            if cat and cat_method(apt_method(base)[0])[0] > 0 and 0 < fraction <= 1:
                return m
        except (ValueError, argparse.ArgumentTypeError):
            pass
        raise argparse.ArgumentTypeError(f"unknown method {m!r}; cheaper preservation: "
                                         "cat<alpha>[:mode]/k<every>/p<fraction>/local[:unit|relative] with alpha > 0, "
                                         "every >= 1 and fraction in (0, 1], e.g. cat1/k4, cat1/p0.5, cat1/local")
    if m.startswith("catversion"):  # catversion[:earlier], catversion[:earlier]+cat<alpha>
        try:
            catversion_alpha(m)
            return m
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    try:
        base, part = apt_method(m)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown method {m!r}; APT methods: apt[:ada|rs|aa|skip|earlier], "
                                         "cat<alpha>+apt[:part]") from None
    if part is not None:
        if part in APT_PARTS and base != "prior" and (base == "lora" or method_name(base)):
            return m
        raise argparse.ArgumentTypeError(f"unknown method {m!r}; APT methods: apt[:ada|rs|aa|skip|earlier], "
                                         "cat<alpha>+apt[:part]")
    if m in ("lora", "prior"):
        return m
    if m.startswith("cat"):
        try:
            alpha, mode = cat_method(m)
        except ValueError:
            alpha, mode = float("nan"), ""
        if math.isfinite(alpha) and alpha >= 0 and mode in ("class", "strip", "empty", "all", "auto", "nearest") \
                and not (mode in ("auto", "nearest") and alpha == 0):
            return m
    raise argparse.ArgumentTypeError(f"unknown method {m!r}; choose from lora, prior, "
                                     "cat<alpha>[:class|strip|empty|all|auto|nearest] (e.g. cat1, cat0.5:strip, "
                                     "cat1:all, cat1:auto, cat1:nearest; auto and nearest need alpha > 0), "
                                     "apt[:ada|rs|aa|skip|earlier], "
                                     "cat<alpha>+apt[:part], catversion[:earlier][+cat<alpha>]")
