"""Rebuilds probe_words.txt, the vocabulary `nearest` auto preservation ranks (cat_train/terms/nearest.py). Run once,
by hand, when the list should change; the pack ships its output and reads nothing else at run time.

    apt-get install wordnet-base                # Debian's WordNet 3.0 (/usr/share/wordnet)
    python -m cat_train.terms.vocabulary.build  # needs open_clip and torchvision, both local packages

Three public sources, each under a licence that allows redistribution with GPL-3.0 code:
- WordNet 3.0 (Princeton University, the WordNet 3.0 licence: permission to use, copy, modify and distribute with its
  notice kept, which probe_words.txt carries): every noun lemma tagged at least MIN_TAGS times in WordNet's sense-
  tagged corpora (cntlist.rev). The tag count is a frequency: it keeps the 12,000 nouns that occur there (dog 42,
  circle 31, painting 27, triangle 2, wolf 1) and drops the 100,000 that never do (taxonomic names, places, people),
  without a hand-made list. At 2 tags "wolf" fell out: 1 keeps such common words. Of those, only nouns an image can
  show as its subject (`pictured`: WordNet's own sense order and lexicographer files decide, no hand-made list): 4,953
  of the 12,003. The rest ranked near a class word without being a class: on the world "background", "white",
  "green" and "blue" were 4 of the 8 nearest to "circle" and diluted the probes (docs/auto-preservation.md).
- The ImageNet-1k class names as open_clip ships them (open_clip.zero_shot_metadata, MIT): breeds, species, objects.
- The COCO and Pascal VOC category names as torchvision ships them (torchvision.models._meta, BSD-3-Clause).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

MIN_TAGS = 1
# WordNet's lexicographer files (lexnames) whose nouns an image can show as its subject: noun.Tops (person, animal,
# object), animal, artifact, body, food, object, person, plant, shape, substance. Left out: attributes (colours:
# "white", "blue"), locations ("background"), acts, communication, cognition, time, quantities and the rest.
PICTURED = {3, 5, 6, 8, 13, 17, 18, 20, 25, 27}
PERSON = 18
COLOUR = "04956594"  # the synset {color, colour, coloring, colouring} (noun.attribute): every colour is under it
WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent / "probe_words.txt"
HEADER = """\
# Probe vocabulary of `nearest` auto preservation (cat_train/terms/nearest.py): one word or short phrase per line.
# Built by cat_train/terms/vocabulary/build.py (see there, and README.md beside this file) from:
#   WordNet 3.0 nouns tagged >= {min_tags} times in its sense-tagged corpora whose commonest sense is a thing an image
#   shows ({wordnet} words), ImageNet-1k class names as open_clip ships them ({imagenet}),
#   COCO and Pascal VOC categories as torchvision ships them ({coco}).
# {total} entries, lower case, sorted, no duplicates.
#
# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES,
# EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
# WARRANTIES OF MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE,
# DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS.
# The name of Princeton University or Princeton may not be used in advertising or publicity pertaining to
# distribution of the software and/or database. Title to copyright in this software, database and any associated
# documentation shall at all times remain with Princeton University and LICENSEE agrees to preserve same.
# (Permission to use, copy, modify and distribute this database for any purpose and without fee or royalty is
# granted by Princeton University under the WordNet 3.0 licence, with this notice kept on all copies.)
"""


def wordnet_nouns(folder: Path = WORDNET, min_tags: int = MIN_TAGS) -> list[str]:
    """Noun lemmas tagged at least min_tags times (cntlist.rev lines: `lemma%1:... sense_number count`) that are
    `pictured`."""
    for name in ("cntlist.rev", "index.noun", "data.noun"):
        if not (folder / name).is_file():
            raise SystemExit(f"{folder / name} is missing: install Debian's wordnet-base "
                             "(apt-get install wordnet-base).")
    tags: Counter[str] = Counter()
    for line in (folder / "cntlist.rev").read_text().splitlines():
        key, _, count = line.split()
        lemma, _, sense = key.partition("%")
        if sense.startswith("1:"):  # lexical category 1: noun
            tags[lemma] += int(count)
    synsets, senses = noun_synsets(folder), noun_senses(folder)
    return [w for w, n in tags.items() if n >= min_tags and pictured(senses.get(w, ()), synsets)]


def noun_synsets(folder: Path) -> dict[str, tuple[int, tuple[str, ...]]]:
    """{synset offset: (lexicographer file number, hypernym offsets)} from data.noun."""
    out = {}
    for line in (folder / "data.noun").read_text().splitlines():
        if line.startswith("  "):  # the licence header
            continue
        f = line.split(" | ")[0].split()
        words = int(f[3], 16)
        at = 4 + 2 * words
        ptrs = f[at + 1:at + 1 + 4 * int(f[at])]
        out[f[0]] = (int(f[1]), tuple(ptrs[i + 1] for i in range(0, len(ptrs), 4) if ptrs[i] in ("@", "@i")))
    return out


def noun_senses(folder: Path) -> dict[str, tuple[str, ...]]:
    """{lemma: its synset offsets}, commonest sense first (index.noun orders them by tag count)."""
    out = {}
    for line in (folder / "index.noun").read_text().splitlines():
        if not line.startswith("  "):
            f = line.split()
            out[f[0]] = tuple(f[-int(f[2]):])
    return out


def _is_colour(offset: str, synsets: dict) -> bool:
    todo, seen = [offset], set()
    while todo:
        o = todo.pop()
        if o == COLOUR:
            return True
        if o not in seen:
            seen.add(o)
            todo += synsets[o][1]
    return False


def pictured(senses: tuple[str, ...], synsets: dict) -> bool:
    """Whether a noun names something an image shows as its subject: its commonest sense is in one of the PICTURED
    lexicographer files, and it is no colour word whose commonest sense is a person ("white")."""
    if not senses or synsets[senses[0]][0] not in PICTURED:
        return False
    return synsets[senses[0]][0] != PERSON or not any(_is_colour(o, synsets) for o in senses)


def clean(word: str) -> str:
    return " ".join(word.replace("_", " ").lower().split())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train.terms.vocabulary.build", description=__doc__.split("\n")[0])
    ap.add_argument("--min-tags", type=int, default=MIN_TAGS)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torchvision.models._meta import _COCO_CATEGORIES, _VOC_CATEGORIES

    wn = {clean(w) for w in wordnet_nouns(min_tags=a.min_tags)}
    imagenet = {clean(w) for w in IMAGENET_CLASSNAMES}
    coco = {clean(w) for w in (*_COCO_CATEGORIES, *_VOC_CATEGORIES) if w not in ("__background__", "N/A")}
    words = sorted(w for w in wn | imagenet | coco if len(w) > 1 and any(ch.isalpha() for ch in w)
                   and w.replace(" ", "").replace("-", "").replace("'", "").isalnum())
    a.out.write_text(HEADER.format(min_tags=a.min_tags, wordnet=len(wn), imagenet=len(imagenet), coco=len(coco),
                                   total=len(words)) + "\n".join(words) + "\n")
    print(f"wrote {a.out}: {len(words)} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
