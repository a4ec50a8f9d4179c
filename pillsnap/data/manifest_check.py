"""Is a stage's manifest fit to train on? A list of findings, each with what is wrong and how to fix it
(scripts/stage3/validate_stage3_manifest.py prints them; the stage 3 training script runs it before training)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

REQUIRED_COLUMNS = ("image_path", "mapping_code", "image_type", "split", "photo_id", "width", "height", "bbox_x",
                    "bbox_y", "bbox_w", "bbox_h")
CODE = re.compile(r"^K-\d{6}$")
SPLITS = ("train", "val", "test")
SAMPLE_FILES = 200  # image paths checked on disk (a sample: a real stage has 100,000 photos)


@dataclass(frozen=True)
class Finding:
    ok: bool
    check: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        head = f"{'OK  ' if self.ok else 'FAIL'} {self.check}: {self.detail}"
        return head if self.ok or not self.fix else f"{head}\n     fix: {self.fix}"


def _columns(rows: pd.DataFrame) -> Finding:
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    return Finding(not missing, "columns", f"missing {missing}" if missing else f"{len(rows.columns)} columns",
                   "rescan with this version: pillsnap data scan --data-root ROOT --out MANIFEST_DIR")


def _codes(rows: pd.DataFrame) -> Finding:
    bad = sorted(set(rows.loc[~rows["mapping_code"].astype(str).str.match(CODE), "mapping_code"].astype(str)))
    return Finding(not bad, "drug codes", f"{len(bad)} malformed, e.g. {bad[:3]}" if bad else "all K-XXXXXX",
                   "the label files name these codes; check them with pillsnap data scan's report")


def _splits(stage_rows: pd.DataFrame) -> list[Finding]:
    counts = stage_rows["split"].value_counts().to_dict()
    singles = stage_rows[stage_rows["image_type"] == "single"]
    train_codes, val_codes = (set(singles.loc[singles["split"] == s, "mapping_code"]) for s in ("train", "val"))
    unseen = sorted(val_codes - train_codes)
    return [
        Finding(counts.get("train", 0) > 0 and counts.get("val", 0) > 0, "splits",
                ", ".join(f"{s} {counts.get(s, 0)}" for s in SPLITS),
                "the stage needs train and val rows: lower data.val_ratio or raise the stage's max_samples"),
        Finding(not unseen, "val classes in train", f"{len(unseen)} val classes never trained, e.g. {unseen[:3]}"
                if unseen else f"all {len(val_codes)} val classes are trained",
                "rescan with the same data.split_seed so the split stays class-stratified"),
    ]


def _stage_size(settings: DictConfig, stage: int, stage_rows: pd.DataFrame, class_minimum: bool) -> list[Finding]:
    """The classes the stage's classifier trains and its photos against what the stage asks. Too few classes fail
    where the stage's gate needs `min_class_coverage` of them trained (`class_minimum`: stages 3-4), so that the
    run is stopped before hours of training that could only end NO_GO; elsewhere they are noted."""
    trains = stage_rows["stage_class"] & stage_rows["split"].eq("train")
    classes = int(stage_rows.loc[trains, "mapping_code"].nunique())
    need, asked = int(settings.min_class_coverage), int(settings.max_classes)
    short = classes < need
    if short and class_minimum:
        detail = (f"{classes} classes to train, the stage's gate needs {need} (min_class_coverage; "
                  f"max_classes asks {asked})")
    elif short and bool(settings.allow_success_on_time_cap):
        detail = (f"{classes} classes to train (max_classes asks {asked}); a run the time cap stops needs {need} "
                  "(min_class_coverage) to count as a success")
    else:
        detail = f"{classes} classes to train (max_classes asks {asked}; min_class_coverage {need})"
    singles = stage_rows["image_type"].eq("single") & stage_rows["split"].isin(("train", "val"))
    photos, asked_photos = int(stage_rows.loc[singles, "photo_id"].nunique()), int(settings.max_samples)
    return [Finding(not (short and class_minimum), "stage classes", detail,
                    f"scan the whole data set (pillsnap data scan), or for a smaller rehearsal lower "
                    f"data.progressive_validation.stage_{stage}.min_class_coverage"),
            Finding(True, "stage photos", f"{photos} single-pill train+val photos (max_samples asks {asked_photos})"
                    + ("" if photos >= 0.9 * asked_photos else ": the data holds no more of these classes"))]


def _files(stage_rows: pd.DataFrame) -> Finding:
    paths = stage_rows["image_path"].drop_duplicates()
    sample = paths.sample(min(SAMPLE_FILES, len(paths)), random_state=0) if len(paths) else paths
    missing = [p for p in sample if not Path(p.split("!")[0].removeprefix("zip:")).exists()]
    return Finding(not missing, "image files", f"{len(missing)} of {len(sample)} sampled missing, e.g. {missing[:2]}"
                   if missing else f"{len(sample)} sampled files present",
                   "the data moved since the scan: rescan, or fix paths.data_root")


def stage_manifest_dir(manifest_dir: str | Path, stage: int) -> Path:
    """Where `pillsnap data manifest --stage N` writes the stage's manifest_{train,val}.csv: one folder per stage
    (the design's artifacts/stage3/), so writing one stage's files never spoils another stage's pre-flight."""
    return Path(manifest_dir) / f"stage{int(stage)}"


def _stage_files(manifest_dir: Path, stage_rows: pd.DataFrame) -> list[Finding]:
    findings = []
    for split in ("train", "val"):
        path = manifest_dir / f"manifest_{split}.csv"
        expected = int((stage_rows["split"] == split).sum())
        if not path.is_file():
            findings.append(Finding(True, path.name, "absent (optional; the trainer reads manifest.parquet)"))
            continue
        found = sum(1 for _ in path.open(encoding="utf-8")) - 1
        findings.append(Finding(found == expected, path.name, f"{found} rows, the stage selects {expected}",
                                "out of date: rerun pillsnap data manifest --stage N"))
    return findings


def check_stage_manifest(cfg: DictConfig, stage: int | None = None, class_minimum: bool = False) -> list[Finding]:
    """Findings for the manifest under paths.manifest_dir and the rows `stage` selects (default: current);
    `class_minimum`: the stage's gate needs its `min_class_coverage` classes trained (eval.criteria's
    needs_class_minimum), so fewer fail here."""
    from pillsnap.config import stage_settings
    from pillsnap.data.scan import load_manifest
    from pillsnap.data.stages import select_stage

    manifest_dir = Path(cfg.paths.manifest_dir)
    try:
        rows = load_manifest(manifest_dir)
    except FileNotFoundError as err:
        return [Finding(False, "manifest", str(err), "pillsnap data scan --data-root ROOT --out " + str(manifest_dir))]
    findings = [Finding(len(rows) > 0, "manifest", f"{len(rows)} rows in {manifest_dir}",
                        "the scan kept nothing: read scan_report.json and rescan"), _columns(rows)]
    if not all(f.ok for f in findings):
        return findings
    try:
        stage_rows = select_stage(rows, cfg, stage)
    except ValueError as err:
        return [*findings, Finding(False, "stage selection", str(err), "check data.progressive_validation")]
    findings += [_codes(rows), Finding(len(stage_rows) > 0, "stage rows", f"{len(stage_rows)} rows selected",
                                       "check data.progressive_validation.stage_N sizes")]
    number = int(cfg.data.progressive_validation.current_stage if stage is None else stage)
    size = (_stage_size(stage_settings(cfg, number), number, stage_rows, class_minimum)
            if cfg.data.progressive_validation.enabled and len(stage_rows) else [])
    return (findings + _splits(stage_rows) + size + [_files(stage_rows)]
            + _stage_files(stage_manifest_dir(manifest_dir, number), stage_rows))
