"""Kohya-style image folders: captions, trigger insertion, aspect buckets, robust image decoding.

    root/10_sks dog/a.png + a.txt    -> repeats 10; caption from a.txt, else the folder's "sks dog"
    root/b.jpg                       -> repeats 1; caption from b.txt, else "<trigger> <class word>"

Images come out as float tensors (3, H, W) in [-1, 1] at their bucket size; the caller encodes them
(VAE) once. Repeats are kept as sampling weights, not copies.

Masks (masked training: terms/mask.py weighs them, data/masks.py reads them) only when asked (`masks`): a mask
file beside the image named as OneTrainer names them, `a-masklabel.png` for `a.png` (white = subject, black =
background, grey between), or else the image's own alpha channel (kohya's `alpha_mask`). A mask goes through the
same EXIF turn, cover-resize and centre crop as its image, so it lies on the same pixels in every bucket. Mask
files are never training images. Decoding and buckets: data/images.py.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from .images import IMAGE_EXTS, UNSUPPORTED_EXTS, DatasetError, fit_to, load_image, make_buckets, nearest_bucket
from .masks import (COLOUR_NOTE, MASK_SUFFIX, MaskError, MaskSource, check_mask_source, fit_mask_to, is_mask_file,
                    load_mask, mask_file_of)
from .prompts import check_trigger_not_class_word, ensure_trigger, parse_class_words, triggers_in

log = logging.getLogger("cat_train")
MAX_FILES = 100_000  # entries read in a dataset folder and its N_name folders; beyond it the folder is refused
Insert = Literal["prepend", "append", "off"]
# Smaller sides are upscaled many times to reach a bucket: the VAE then encodes blur, and with 8 px per
# latent pixel the subject spans a handful of latents. Warned about, not refused: it may be intended.
MIN_SIDE = 64


@dataclass
class ImageRecord:
    path: Path
    caption: str
    triggers: tuple[str, ...]
    repeats: int
    caption_file: Path | None = None
    caption_encoding: str | None = None  # the legacy encoding a non-UTF-8 caption file was read with
    mask_file: Path | None = None  # its <stem>-masklabel file, if there is one (used when masks are on)


def read_caption(path: Path) -> tuple[str, str | None]:
    """The caption file's text, and the legacy encoding used when it is not UTF-8 (else None).

    Captions written on Windows are often Windows-1252 ('café' as b'caf\\xe9'); every byte sequence is
    readable that way or as Latin-1, so a caption is never lost to a decode error, and the caller warns.
    """
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Notepad's "Unicode": UTF-16 with a byte-order mark
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError as e:
            raise DatasetError(f"caption file {path} starts like UTF-16 but does not decode ({e.reason} at byte "
                               f"{e.start}); re-save it as UTF-8.") from None
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined
        return data.decode("latin-1"), "Latin-1"


def legacy_caption_note(records: Sequence[ImageRecord]) -> str | None:
    legacy = [r for r in records if r.caption_encoding]
    if not legacy:
        return None
    listed = ", ".join(f"{r.caption_file} ({r.caption_encoding}: {r.caption!r})" for r in legacy[:5])
    more = f" and {len(legacy) - 5} more" if len(legacy) > 5 else ""
    return (f"{len(legacy)} caption file(s) are not UTF-8 and were read as a legacy Windows encoding: {listed}{more}; "
            "if a letter looks wrong, re-save the file as UTF-8.")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not is_mask_file(p))


def caption_suffix(caption_ext: str) -> str:
    """'.txt' from '.txt' or 'txt'; refuses an empty one (Path.with_suffix('.') raised 'Invalid suffix') and an image
    extension (captions read from the images' own bytes)."""
    ext = (caption_ext or "").strip()
    if ext in ("", "."):
        raise DatasetError("caption_extension is empty; captions are read from files named like the image with this "
                           "extension: use '.txt' (or '.caption').")
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() in IMAGE_EXTS + UNSUPPORTED_EXTS:
        raise DatasetError(f"caption_extension {ext!r} is an image extension: captions would be read from the images' "
                           "own bytes; use '.txt' (or '.caption'), the extension of the caption files.")
    if any(c in ext for c in "/\\") or len(ext) > 32:
        raise DatasetError(f"caption_extension {ext[:40]!r} is not a file extension; use '.txt' (or '.caption').")
    return ext


def folders(root: str | Path) -> tuple[list[tuple[Path, int, str]], list[str]]:
    """(folder, repeats, name) of the root and its kohya 'N_name' folders, and notes on what was left out.

    A folder reached twice (a link like '10_loop -> .') is read once: its images would otherwise count again with
    other repeats. More than MAX_FILES entries is refused before anything is read (a folder like /usr)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder; create it and put the training "
                           "images (with same-name .txt captions) in it.")
    groups: list[tuple[Path, int, str]] = [(root, 1, "")]
    seen, notes, listing = {root.resolve()}, [], _capped_listing(root, 0)
    entries = len(listing)
    for sub in sorted(p for p in listing if p.is_dir()):
        m = re.match(r"^(\d+)_(.*)$", sub.name)
        if not (m and int(m.group(1)) > 0):
            log.warning("ignoring folder %s: kohya repeat folders are named 'N_name' (e.g. '10_sks dog')", sub)
            continue
        real = sub.resolve()
        if real in seen:
            notes.append(f"folder {sub} leads to {real}, which is already read (a link back?); its images are used "
                         "once: remove the link or make it a real folder.")
            log.warning(notes[-1])
            continue
        seen.add(real)
        groups.append((sub, int(m.group(1)), m.group(2).strip()))
    for folder, *_ in groups[1:]:
        entries += len(_capped_listing(folder, entries))
    return groups, notes


def _capped_listing(folder: Path, already: int) -> list[Path]:
    out = []
    for p in folder.iterdir():
        out.append(p)
        if already + len(out) > MAX_FILES:
            raise DatasetError(f"dataset folder {folder} holds more than {MAX_FILES} files with its N_name folders; "
                               "is it the right folder? Point the dataset at a folder of training images.")
    return out


def unsupported_files(groups: Sequence[tuple[Path, int, str]]) -> list[tuple[Path, str]]:
    return [(p, f"{p.suffix.lower()} is not a format the trainer reads; convert it to PNG or JPEG to train on it.")
            for folder, *_ in groups for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in UNSUPPORTED_EXTS]


def scan_folder(root: str | Path, triggers: Sequence[str], class_word: str = "", caption_ext: str = ".txt",
                insert_trigger: Insert = "prepend") -> list[ImageRecord]:
    root = Path(root).expanduser()
    triggers = tuple(dict.fromkeys(t.strip() for t in triggers))  # a trigger listed twice is one trigger
    if not triggers or not all(triggers):
        raise DatasetError("give at least one non-empty trigger token (e.g. 'sks'); CAT needs it to tell y_T from y.")
    try:  # 'dog' for every trigger, or one word per trigger ('sks=dog, zwx=cat')
        words = parse_class_words(class_word)
        if isinstance(words, dict):
            for t, w in words.items():
                check_trigger_not_class_word([t], w)
            class_word = words.get(triggers[0], "")
        else:
            check_trigger_not_class_word(triggers, words)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    ext = caption_suffix(caption_ext)
    groups, _ = folders(root)
    records = []
    for folder, repeats, name in groups:
        for path in _images(folder):
            cap_file = path.with_suffix(ext)
            raw, encoding = read_caption(cap_file) if cap_file.is_file() else ("", None)
            text = " ".join(raw.split())
            caption = text or name or " ".join(w for w in (triggers[0], class_word.strip()) if w)  # empty file = none
            if not triggers_in(caption, triggers):
                if insert_trigger == "off":
                    raise DatasetError(f"caption of {path} has no trigger {list(triggers)}: {caption!r}; add the token "
                                       f"to {cap_file.name} or turn trigger insertion on ('prepend' or 'append').")
                own = triggers_in(name, triggers)
                caption = ensure_trigger(caption, own[0] if own else triggers[0], insert_trigger)
            records.append(ImageRecord(path, caption, triggers_in(caption, triggers), repeats,
                                       cap_file if cap_file.is_file() else None, encoding, mask_file_of(path)))
    if not records:
        masks = [p.name for folder, *_ in groups for p in sorted(folder.iterdir()) if p.is_file() and is_mask_file(p)
                 and p.suffix.lower() in IMAGE_EXTS]
        if masks:
            raise DatasetError(f"{root} holds only mask files ({len(masks)}: {', '.join(masks[:3])}"
                               f"{', ...' if len(masks) > 3 else ''}): a mask goes beside its image (a.png and "
                               f"a{MASK_SUFFIX}.png); put the training images in the folder too.")
        raise DatasetError(f"no images in {root} or its 'N_name' subfolders; accepted: {', '.join(IMAGE_EXTS)}.")
    note = legacy_caption_note(records)
    if note:
        log.warning(note)
    return records


@dataclass
class DatasetItem:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    caption: str
    triggers: tuple[str, ...]
    repeats: int
    path: Path
    mask: torch.Tensor | None = None  # (H, W) in [0, 1], 1 = subject, on the same pixels as `pixels`


@dataclass
class Dataset:
    items: list[DatasetItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also logged; for a host to show beside the summary
    mask_problems: list[str] = field(default_factory=list)  # DatasetPlan's: training.checks.check_masks refuses them

    @property
    def buckets(self) -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}
        for it in self.items:
            key = (it.pixels.shape[-1], it.pixels.shape[-2])
            out[key] = out.get(key, 0) + 1
        return out

    def summary(self) -> str:
        b = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        s = f"{len(self.items)} images, {len(self.buckets)} bucket{'s' * (len(self.buckets) != 1)} ({b})"
        masked = sum(it.mask is not None for it in self.items)
        s += f", {masked} with masks" if masked else ""
        return s + (f", {len(self.skipped)} skipped" if self.skipped else "")


def trigger_notes(triggers: Sequence[str], records: Sequence[ImageRecord]) -> list[str]:
    """Triggers listed twice, and triggers no caption holds (they would train nothing)."""
    listed = [t.strip() for t in triggers if t.strip()]
    notes = []
    twice = sorted({t for t in listed if listed.count(t) > 1})
    if twice:
        notes.append(f"triggers lists {', '.join(repr(t) for t in twice)} more than once; each is used once.")
    unused = [t for t in dict.fromkeys(listed) if not any(t in r.triggers for r in records)]
    if unused:
        shown = ", ".join(repr(t) for t in unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        notes.append(f"{len(unused)} of {len(set(listed))} triggers appear in no caption ({shown}): they are not "
                     "trained; add them to the captions (or folder names), or remove them from triggers.")
    return notes


def check_resolution(resolution: int, step: int = 64) -> None:
    """Bucket sides are multiples of `step`: another resolution trained at a surprise size (100 -> 64x128)."""
    if not isinstance(resolution, int) or resolution < step or resolution % step:
        near = max(step, round(resolution / step) * step) if isinstance(resolution, (int, float)) else 512
        raise DatasetError(f"resolution {resolution} is not a multiple of {step} (>= {step}); bucket sides are "
                           f"multiples of {step}: use {near}.")


@dataclass
class DatasetPlan:
    """A scanned folder, before any image is decoded: what decode() will read, one image at a time, so memory
    holds one decoded image (plus the caller's latents), not every image as float32 at once."""
    root: Path
    records: list[ImageRecord]
    sizes: list[tuple[int, int]]
    resolution: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    small: list[str] = field(default_factory=list)
    masks: str = "off"  # MASK_SOURCES
    masked: int = 0     # images decoded with a mask
    mask_problems: list[str] = field(default_factory=list)  # mask files that could not be used: what and the fix
    coloured: list[str] = field(default_factory=list)  # mask files in colour

    def budget(self, latent_channels: int = 4, scale: int = 8) -> str:
        """The memory line printed before decoding: one image's pixels at a time, every latent kept."""
        big = max(w * h for w, h in self.sizes)
        latents = len(self.records) * latent_channels * big // (scale * scale) * 4
        return (f"dataset {self.root}: {len(self.records)} images, decoded one at a time ({big * 12 / 2**20:.1f} MB of "
                f"pixels at most at once), latents kept: at most {latents / 2**20:.1f} MB")

    def decode(self) -> Iterator[DatasetItem]:
        """Each readable image at its bucket size; an unreadable one goes to `skipped` (named, with why)."""
        for r in self.records:
            try:
                try:
                    img, mask = (load_mask(r.path, r.mask_file, self.masks) if self.masks != "off"
                                 else (load_image(r.path), None))
                except MaskError as e:  # a bad mask costs the image its mask, not its place in training
                    self.mask_problems.append(str(e))
                    img, mask = load_image(r.path), None
            except DatasetError as e:
                self.skipped.append((r.path, str(e)))
                continue
            if min(img.size) < MIN_SIDE:
                self.small.append(f"{r.path.name} ({img.width}x{img.height})")
            size = nearest_bucket(img.width, img.height, self.sizes)
            self.masked += mask is not None
            if mask is not None and mask.info.get("cat_colour"):
                self.coloured.append(r.mask_file.name if r.mask_file else r.path.name)
            yield DatasetItem(fit_to(img, size), r.caption, r.triggers, r.repeats, r.path,
                              None if mask is None else fit_mask_to(mask, size))

    def mask_note(self, n_items: int) -> str | None:
        """How many images have masks (masks on), or that mask files were found and not used (masks off)."""
        files = sum(r.mask_file is not None for r in self.records)
        if self.masks == "off":
            return (f"{files} mask file(s) (<name>{MASK_SUFFIX}.png) found and not used: masks is off (they are not "
                    "trained as images either); set masks to auto or file to train with them.") if files else None
        where = {"auto": f"{MASK_SUFFIX} files or alpha channels", "file": f"{MASK_SUFFIX} files",
                 "alpha": "alpha channels"}[self.masks]
        if self.masks == "auto" and not self.masked:  # nothing asked for, nothing found: nothing to say
            return None
        return (f"masks ({self.masks}): {self.masked} of {n_items} images have a mask ({where}); the others weigh 1 "
                "everywhere. Masks weigh something only with mask_floor < 1 or mask_keep > 0 (CAT Training Options)."
                + ("" if self.masked else " Masked training changes nothing without masks."))

    def finish(self, n_items: int) -> list[str]:
        """After decode(): refuse an all-unreadable folder; the warnings to show (also logged)."""
        unreadable = [(p, why) for p, why in self.skipped if p.suffix.lower() not in UNSUPPORTED_EXTS]
        if unreadable:
            log.warning("skipped %d image(s): %s", len(unreadable), "; ".join(why if str(p) in why else f"{p}: {why}"
                                                                         for p, why in unreadable))
        if not n_items:
            raise DatasetError(f"no readable image in {self.root}; all {len(self.skipped)} failed to decode: "
                               + "; ".join(f"{p.name}: {why}" for p, why in self.skipped))
        warnings = list(self.warnings)
        if self.mask_problems:
            more = f" and {len(self.mask_problems) - 3} more" if len(self.mask_problems) > 3 else ""
            warnings.append(f"{len(self.mask_problems)} mask file(s) not used, their images train without a mask "
                            f"(masked training refuses them: mask_floor < 1 or mask_keep > 0): "
                            f"{'; '.join(self.mask_problems[:3])}{more}.")
            log.warning(warnings[-1])
        note = self.mask_note(n_items)
        if note:
            warnings.append(note)
            log.warning(note)
        if self.coloured:
            more = f" and {len(self.coloured) - 5} more" if len(self.coloured) > 5 else ""
            warnings.append(f"{len(self.coloured)} mask file(s) are in colour ({', '.join(self.coloured[:5])}{more}): "
                            f"{COLOUR_NOTE}.")
            log.warning(warnings[-1])
        if self.small:
            more = f" and {len(self.small) - 5} more" if len(self.small) > 5 else ""
            warnings.append(f"{len(self.small)} image(s) in {self.root} are smaller than {MIN_SIDE} px on a side: "
                            f"{', '.join(self.small[:5])}{more}; "
                            f"they are upscaled to a bucket of about {self.resolution} px and teach mostly blur: use "
                            "larger images or remove them.")
            log.warning(warnings[-1])
        return warnings


def plan_dataset(root: str | Path, triggers: Sequence[str], class_word: str = "", caption_ext: str = ".txt",
                 insert_trigger: Insert = "prepend", resolution: int = 512, buckets: bool = True,
                 bucket_step: int = 64, masks: MaskSource = "off") -> DatasetPlan:
    check_resolution(resolution, bucket_step)
    check_mask_source(masks)
    records = scan_folder(root, triggers, class_word, caption_ext, insert_trigger)
    groups, folder_notes = folders(root)
    unsupported = unsupported_files(groups)
    if unsupported:
        log.warning("skipped %d file(s) in formats the trainer does not read: %s", len(unsupported),
                    ", ".join(str(p) for p, _ in unsupported))
    tnotes = trigger_notes(triggers, records)
    for n in tnotes:  # scan_folder and folders() logged theirs
        log.warning(n)
    notes = folder_notes + [n for n in [legacy_caption_note(records)] if n] + tnotes
    sizes = make_buckets(resolution, bucket_step) if buckets else [(resolution, resolution)]
    return DatasetPlan(Path(root).expanduser(), records, sizes, resolution, list(unsupported), notes, masks=masks)


def load_dataset(root: str | Path, triggers: Sequence[str], class_word: str = "", caption_ext: str = ".txt",
                 insert_trigger: Insert = "prepend", resolution: int = 512, buckets: bool = True,
                 bucket_step: int = 64, masks: MaskSource = "off") -> Dataset:
    """Every image decoded into memory (scripts and tests); a host with many images decodes plan_dataset's
    images one at a time instead."""
    plan = plan_dataset(root, triggers, class_word, caption_ext, insert_trigger, resolution, buckets, bucket_step,
                        masks)
    items = list(plan.decode())
    warnings = plan.finish(len(items))
    return Dataset(items, plan.skipped, warnings, plan.mask_problems)


__all__ = ["DatasetError", "Dataset", "DatasetItem", "DatasetPlan", "ImageRecord", "IMAGE_EXTS", "MIN_SIDE",
        "UNSUPPORTED_EXTS",
           "caption_suffix", "check_resolution", "fit_mask_to", "fit_to", "is_mask_file", "load_mask", "mask_file_of",
           "folders", "load_dataset", "plan_dataset",
           "load_image", "make_buckets", "nearest_bucket", "read_caption", "scan_folder"]
