"""Label quality checks on the pills of one photo: boxes that overlap or outnumber the pills, pills without a box.

Published AI Hub labels have such errors (one pill's box copied onto another, a pill left unlabelled). A photo
that fails a check keeps its rows, but its detection ground truth is not trusted (`incomplete_gt`), and a pill
whose own box is in doubt (`box_issue`) does not train or test the classifier either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from pillsnap.data.aihub import LabelRecord

# Two pills of one photo never lie on top of each other; boxes that share more than this share of the smaller
# box are a copied or moved box (measured on the 4,526 real competition labels, this flags exactly the 8 photos
# known to have one).
OVERLAP_LIMIT = 0.3
# Photo-level reasons, in the order the scan report lists them.
PHOTO_REASONS = ("overlapping_boxes", "box_count_above_pills", "box_count_below_pills")


class PhotoCheck(NamedTuple):
    issues: list[str]  # per record: "" (sound) | "overlap" | "extra_box"
    reasons: list[str]  # the PHOTO_REASONS this photo fails
    incomplete: bool  # the photo's boxes cannot serve as detection ground truth


def overlap_share(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection of two xywh boxes as a share of the smaller box's area."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1, min(a[2] * a[3], b[2] * b[3]))


def overlapping_pairs(boxes: Sequence[Sequence[int]], limit: float = OVERLAP_LIMIT) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if overlap_share(boxes[i], boxes[j]) > limit]


def check_photo(codes: Sequence[str], records: Sequence[LabelRecord]) -> PhotoCheck:
    """Check the kept records of one photo against each other and against the pills its file name lists."""
    if len(records) == 1 and len(codes) == 1 and records[0].n_boxes == 1:  # the common case, kept cheap
        return PhotoCheck([""], [], False)
    issues = [""] * len(records)
    reasons = []
    per_code = Counter(r.mapping_code for r in records)
    # More boxes than pills: a label with several boxes, or two labels for one pill. Which box is right is unknown.
    extra = [i for i, r in enumerate(records) if r.n_boxes > 1 or per_code[r.mapping_code] > 1]
    for i in extra:
        issues[i] = "extra_box"
    if extra:
        reasons.append("box_count_above_pills")
    pairs = overlapping_pairs([r.bbox for r in records])
    for i, j in pairs:  # which of the two boxes was copied is unknown: neither crop can be trusted
        issues[i] = issues[i] or "overlap"
        issues[j] = issues[j] or "overlap"
    if pairs:
        reasons.insert(0, "overlapping_boxes")
    if set(codes) - set(per_code):  # a pill of the photo without a (usable) box
        reasons.append("box_count_below_pills")
    return PhotoCheck(issues, reasons, bool(reasons))
