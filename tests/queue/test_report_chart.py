"""Issue 32: runs.png with runs whose scores tie (a sweep over a setting that changed nothing: every run at one
point) wrote their labels over each other; now each label has its own row, tied to its dot."""
from __future__ import annotations

from cat_train.queue.report import chart


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_of_tied_runs_do_not_overlap():
    pts = [(f"run {i}: lr=1e-4", 0.61, 0.83) for i in range(1, 5)] + [("run 5: lr=2e-4", 0.7, 0.5)]
    img = chart(pts, "run 5: lr=2e-4")
    boxes = img.info["label_boxes"]
    assert len(boxes) == 5
    clashes = [(i, j) for i in range(5) for j in range(i + 1, 5) if overlaps(boxes[i], boxes[j])]
    assert clashes == [], clashes
    assert max(b[3] for b in boxes[:4]) - min(b[1] for b in boxes[:4]) <= 4 * 14 + 1  # stacked close to their dot


def test_a_lone_label_stays_beside_its_dot():
    img = chart([("run 1", 0.5, 0.5), ("run 2", 0.9, 0.1)], None)
    (a, b) = img.info["label_boxes"]
    assert not overlaps(a, b)
    assert abs((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) > 100  # far apart: each at its own dot's height
