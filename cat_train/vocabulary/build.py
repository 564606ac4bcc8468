"""Rebuilds probe_words.txt, the vocabulary `nearest` auto preservation ranks (cat_train/nearest.py). Run once, by
hand, when the list should change; the pack ships its output and reads nothing else at run time.

    apt-get install wordnet-base          # Debian's WordNet 3.0 (/usr/share/wordnet)
    python -m cat_train.vocabulary.build  # needs open_clip and torchvision, both local packages

Three public sources, each under a licence that allows redistribution with GPL-3.0 code:
- WordNet 3.0 (Princeton University, the WordNet 3.0 licence: permission to use, copy, modify and distribute with its
  notice kept, which probe_words.txt carries): every noun lemma tagged at least MIN_TAGS times in WordNet's sense-
  tagged corpora (cntlist.rev). The tag count is a frequency: it keeps the 12,000 nouns that occur there (dog 42,
  circle 31, painting 27, triangle 2, wolf 1) and drops the 100,000 that never do (taxonomic names, places, people),
  without a hand-made list. At 2 tags "wolf" fell out: 1 keeps such common words.
- The ImageNet-1k class names as open_clip ships them (open_clip.zero_shot_metadata, MIT): breeds, species, objects.
- The COCO and Pascal VOC category names as torchvision ships them (torchvision.models._meta, BSD-3-Clause).
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

MIN_TAGS = 1
WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent / "probe_words.txt"
HEADER = """\
# Probe vocabulary of `nearest` auto preservation (cat_train/nearest.py): one word or short phrase per line.
# Built by cat_train/vocabulary/build.py (see there, and README.md beside this file) from:
#   WordNet 3.0 nouns tagged >= {min_tags} times in its sense-tagged corpora ({wordnet} words),
#   ImageNet-1k class names as open_clip ships them ({imagenet}), COCO and Pascal VOC categories as torchvision ships them ({coco}).
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
    """Noun lemmas by their tag count summed over senses (cntlist.rev lines: `lemma%1:... sense_number count`)."""
    path = folder / "cntlist.rev"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: install Debian's wordnet-base (apt-get install wordnet-base).")
    tags: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        key, _, count = line.split()
        lemma, _, sense = key.partition("%")
        if sense.startswith("1:"):  # lexical category 1: noun
            tags[lemma] += int(count)
    return [w for w, n in tags.items() if n >= min_tags]


def clean(word: str) -> str:
    return " ".join(word.replace("_", " ").lower().split())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cat_train.vocabulary.build", description=__doc__.split("\n")[0])
    ap.add_argument("--min-tags", type=int, default=MIN_TAGS)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torchvision.models._meta import _COCO_CATEGORIES, _VOC_CATEGORIES

    wn = {clean(w) for w in wordnet_nouns(min_tags=a.min_tags)}
    imagenet = {clean(w) for w in IMAGENET_CLASSNAMES}
    coco = {clean(w) for w in (*_COCO_CATEGORIES, *_VOC_CATEGORIES) if w not in ("__background__", "N/A")}
    words = sorted(w for w in wn | imagenet | coco if len(w) > 1 and any(ch.isalpha() for ch in w) and w.replace(" ", "").replace("-", "").replace("'", "").isalnum())
    a.out.write_text(HEADER.format(min_tags=a.min_tags, wordnet=len(wn), imagenet=len(imagenet), coco=len(coco),
                                   total=len(words)) + "\n".join(words) + "\n")
    print(f"wrote {a.out}: {len(words)} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
