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


def check_stage_manifest(cfg: DictConfig, stage: int | None = None) -> list[Finding]:
    """Findings for the manifest under paths.manifest_dir and the rows `stage` selects (default: current)."""
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
    stage_dir = stage_manifest_dir(manifest_dir, cfg.data.progressive_validation.current_stage if stage is None
                                   else stage)
    return findings + _splits(stage_rows) + [_files(stage_rows)] + _stage_files(stage_dir, stage_rows)
