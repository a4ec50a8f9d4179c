"""Builders of small AI Hub trees for the data tests: from the real label files in ../shared (read there, written
into a temp folder, optionally hand-broken) or by moving parts of a synthetic tree into other layouts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared" / "spec" / "aihub_real_labels"
needs_real = pytest.mark.skipif(not REAL_LABELS.is_dir(), reason="shared/spec/aihub_real_labels not present")
FULL = "K-001900-016548-018110-021026"  # the one real photo with all four pills labelled

Edit = Callable[[str, dict[str, Any]], dict[str, Any] | None]  # (pill code, label) -> label, or None to drop it


def real_labels() -> dict[Path, dict[str, Any]]:
    """Every real label as {path relative to the folder: decoded JSON}."""
    return {p.relative_to(REAL_LABELS): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(REAL_LABELS.rglob("*.json"))}


def blank_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 100, 140)).save(path)  # the scan never decodes photos: any PNG will do


def write_label(path: Path, label: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(label, ensure_ascii=False, indent=4), encoding="utf-8")


def aihub_tree(root: Path, edit: Edit | None = None, part: str = "1.Training") -> Path:
    """The real labels in the AI Hub layout (label and photo folders side by side), each label passed through
    `edit` first; one blank photo per labelled stem."""
    labels_dir = root / part / "라벨링데이터" / "TL_2_조합"
    images_dir = root / part / "원천데이터" / "TS_2_조합"
    for rel, label in real_labels().items():
        label = edit(rel.parent.name, label) if edit else label
        if label is not None:
            write_label(labels_dir / rel, label)
        stem = rel.stem
        blank_png(images_dir / rel.parts[0][:-5] / f"{stem}.png")
    return root


def competition_tree(root: Path, with_images: bool = True) -> Path:
    """The competition layout: flat train_images/*.png beside train_annotations/<combo>_json/K-XXXXXX/*.json,
    and an unlabelled test_images/ folder."""
    for rel, label in real_labels().items():
        write_label(root / "train_annotations" / rel, label)
        if with_images:
            blank_png(root / "train_images" / f"{rel.stem}.png")
    blank_png(root / "test_images" / "K-000101-000202-000303_0_2_0_2_70_000_200.png")
    return root


def move_combinations(root: Path, folders: list[str], part: str) -> None:
    """Move whole combination folders (photos and labels) of a synthetic tree into AI Hub's other partition."""
    for kind, tag in (("원천데이터", "S"), ("라벨링데이터", "L")):
        for folder in folders:
            name = folder if kind == "원천데이터" else f"{folder}_json"
            source = next(root.rglob(name))
            target = root / part / kind / f"V{tag}_1_조합" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), target)


def split_partitions(root: Path, every: int = 2) -> int:
    """Move every `every`-th photo of each single-pill code folder of a synthetic tree, with its label, into AI
    Hub's Validation partition under the same code folder name, as AI Hub ships a drug's Training and Validation
    photos (VS_/VL_ zips beside TS_/TL_); returns how many photos moved."""
    import re

    moved = 0
    for folder in sorted(p for p in root.rglob("K-*") if p.is_dir() and re.fullmatch(r"K-\d{6}", p.name)):
        for photo in sorted(folder.glob("*.png"))[::every]:
            label = next(root.rglob(f"{folder.name}_json/{photo.stem}.json"))
            base = root / "2.Validation"
            for source, target in ((photo, base / "원천데이터" / "단일경구약제 5000종" / "VS_1_단일" / folder.name),
                                   (label, base / "라벨링데이터" / "단일경구약제 5000종" / "VL_1_단일" /
                                    f"{folder.name}_json")):
                target.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), target / source.name)
            moved += 1
    return moved
