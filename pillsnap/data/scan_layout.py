"""Which data layout a scan found, and the diagnosis of a scan that keeps no record.

Two layouts are recognised: AI Hub's (photos in `K-XXXXXX/` folders beside `K-XXXXXX_json/` label folders,
extracted or in zips, any depth) and the competition's (flat `train_images/*.png` beside
`train_annotations/<combo>_json/K-XXXXXX/*.json`). A scan that keeps nothing says what it saw instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pillsnap.data.scan_walk import NOT_UTF8_FIX, Discovery, shown_path

AIHUB, COMPETITION = "aihub", "competition"
EXPECTED = ("the AI Hub layout (photos in K-XXXXXX/ folders beside K-XXXXXX_json/ label folders, extracted or in "
            "zips) or the competition layout (train_images/*.png beside train_annotations/<combo>_json/K-XXXXXX/"
            "*.json)")
_SKIP_HELP = {
    "missing_image": "no photo named like the labels was found: photos go in K-XXXXXX/ folders or flat in one "
                     "folder (train_images/)",
    "bad_json": "the label files are not valid JSON",
    "bad_file_name": "label file names are not K-code + 7 numeric fields",
    "code_not_in_folder": "the labels' drug codes are not in their folder names",
    "file_name_mismatch": "the labels describe other photos than their own file names",
}


def layout_of(found: Discovery) -> dict[str, Any]:
    """The layout name ("aihub", "competition", both joined by "+", or "none") with what supports it."""
    names = [name for name, present in ((AIHUB, found.code_image_folders), (COMPETITION, found.flat_dirs))
             if present]
    if not names:
        names = [AIHUB if found.label_folders else "none"]
    return {"name": "+".join(names), "label_folders": len(found.label_folders),
            "label_files": sum(n for _, _, n in found.label_folders), "image_folders": found.code_image_folders,
            "flat_photo_folders": sorted(found.flat_dirs)}


def _found_text(found: Discovery) -> str:
    layout = layout_of(found)
    photos = sum(found.image_counts.values())
    other = ", ".join(f"{n} {kind}" for kind, n in found.other.most_common(4) if n) or "nothing else"
    return (f"{layout['label_folders']} label folders (K-…_json, {layout['label_files']} label files), "
            f"{layout['image_folders']} photo folders (K-…), {photos} photo(s) counted in zips or flat folders; "
            f"other files: {other}")


def _nearest(found: Discovery, skipped: Counter) -> str:
    head = "Nearest recognised layout:"
    if not found.label_folders and found.not_utf8:
        return (f"{head} none readable: {len(found.not_utf8)} folder(s) or file(s) have names that are not UTF-8 "
                f"(e.g. {shown_path(found.not_utf8[0])}): {NOT_UTF8_FIX}")
    if not found.label_folders:
        if found.code_image_folders or found.flat_dirs:
            return (f"{head} the competition/AI Hub layout without its labels: photos are there but no "
                    "K-XXXXXX_json label folder (train_annotations/ or 라벨링데이터/)")
        if found.other.get(".json", 0) or found.other.get("in zips: .json", 0):
            return (f"{head} the AI Hub layout with renamed label folders: JSON files exist, but label folders "
                    "must be named K-XXXXXX_json (single) or <combo>_json/K-XXXXXX (combination)")
        return f"{head} none (no AI Hub-named photo and no JSON label): is --data-root the folder with the data?"
    layout = layout_of(found)["name"]
    reason, count = skipped.most_common(1)[0] if skipped else ("", 0)
    why = _SKIP_HELP.get(reason, f"every label was rejected as {reason}" if reason else "no label was read")
    return f"{head} the {layout} layout, but {why} ({reason or 'no records'}: {count})"


def diagnose(root: str, found: Discovery, skipped: Counter | None = None) -> str:
    """One line: what was found, what was expected, and the nearest recognised layout with its problem."""
    skipped = Counter({k: v for k, v in (skipped or Counter()).items() if v})
    return (f"scan of {root} kept no record. Found {_found_text(found)}. Expected {EXPECTED}. "
            f"{_nearest(found, skipped)}.")
