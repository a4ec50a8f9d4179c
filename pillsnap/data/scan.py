"""Ingestion (`pillsnap data scan`): AI Hub tree -> manifest.{parquet,csv}, class_map.json, scan_report.json.

Streaming and parallel: label folders are chunked, each chunk is parsed in a worker process into one Parquet
part (so memory stays bounded and a crashed scan resumes from the parts already written); the parts are then
merged with a deterministic train/val/test split of whole groups of near-duplicate photos (splits.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from pillsnap.data.scan_checks import PHOTO_REASONS
from pillsnap.data.scan_chunk import MANIFEST_SCHEMA, process_chunk
from pillsnap.data.scan_layout import diagnose, layout_of
from pillsnap.data.scan_walk import (
    ChunkTask,
    Discovery,
    ScanError,
    discover,
    is_image,
    looked_in,
    make_tasks,
    shown_path,
)
from pillsnap.data.splits import assign_splits, collect_groups, with_split
from pillsnap.utils import atomic_path, ensure_dir, read_json, save_json
from pillsnap.utils.devices import usable_cores
from pillsnap.utils.signals import pool_worker_signals

LOGGER = logging.getLogger(__name__)
# 2: label checks, split groups, AI Hub partition columns; 3: photos paired in their partition; 4: copies of a label
# folder read once; 5: copies merged over the partitions, their photos looked up wherever any copy would look;
# 6: chunks stamped by their zips and folders; 7: a photo's path is the folder it was found in, not its name's
STATE_VERSION = 7


def _state_matches(state_path: Path, expected: dict[str, Any]) -> bool:
    if not state_path.is_file():
        return False
    try:
        state = read_json(state_path)
    except ValueError:
        return False
    return all(state.get(k) == v for k, v in expected.items())


def _prepare_parts(out_dir: Path, expected: dict[str, Any], resume: bool, task_ids: set[str]) -> Path:
    """The parts folder, with the parts of an interrupted scan with the same settings kept where their chunk is still
    one of `task_ids` (a chunk whose labels or photos changed since has another id, and its part goes)."""
    parts = out_dir / "parts"
    state_path = out_dir / "scan_state.json"
    if not (resume and _state_matches(state_path, expected)) and parts.exists():
        LOGGER.info("starting a fresh scan (no matching state in %s)", out_dir)
        shutil.rmtree(parts)
    ensure_dir(parts)
    stale = [p for p in parts.glob("part-*") if p.name.split(".")[0].removeprefix("part-") not in task_ids]
    if stale:
        LOGGER.info("resuming: %d part file(s) of chunks whose labels or photos changed since are read again",
                    len(stale))
        for path in stale:
            path.unlink()
    save_json(state_path, {**expected, "status": "running"})
    return parts


def _run_tasks(tasks: list[ChunkTask], parts: Path, pool: ProcessPoolExecutor | None, workers: int,
               progress: bool, seed: int) -> None:
    todo = [t for t in tasks if not (parts / f"part-{t.task_id}.json").is_file()]
    done_files = sum(t.n_files for t in tasks) - sum(t.n_files for t in todo)
    if done_files:
        LOGGER.info("resuming: %d of %d chunks already done", len(tasks) - len(todo), len(tasks))
    bar = tqdm(total=sum(t.n_files for t in tasks), initial=done_files, desc="scan", unit="file",
               disable=not progress)
    with bar:
        if pool is None:
            for task in todo:
                process_chunk(task, str(parts), seed)
                bar.update(task.n_files)
            return
        _run_pool(todo, parts, pool, bar, seed, 2 * workers)


def _run_pool(todo: list[ChunkTask], parts: Path, pool: ProcessPoolExecutor, bar: tqdm, seed: int,
              max_in_flight: int) -> None:
    # A bounded number of chunks in flight (2 per worker): a submitted task list is not free.
    pending: dict[Future, ChunkTask] = {}
    queue = iter(todo)
    while True:
        while len(pending) < max_in_flight:
            task = next(queue, None)
            if task is None:
                break
            pending[pool.submit(process_chunk, task, str(parts), seed)] = task
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in finished:
            fut.result()  # a crash in a worker is a bug, not a bad record: surface it
            bar.update(pending.pop(fut).n_files)


def _merge(part_files: list[Path], out_dir: Path, splits_of: pd.Series) -> Counter:
    splits: Counter = Counter()
    with (atomic_path(out_dir / "manifest.parquet") as pq_tmp, atomic_path(out_dir / "manifest.csv") as csv_tmp,
          pq.ParquetWriter(pq_tmp, MANIFEST_SCHEMA) as pq_writer, pacsv.CSVWriter(csv_tmp, MANIFEST_SCHEMA) as cw):
        for path in part_files:
            table = pq.read_table(path)
            if not table.num_rows:
                continue
            table = with_split(table, splits_of)
            _count_splits(table, splits)
            pq_writer.write_table(table)
            cw.write_table(table)
    return splits


def _count_splits(table: pa.Table, splits: Counter) -> None:
    """Rows per split, and photos per image type and split (keys "single:train", ...)."""
    frame = table.select(["split", "image_type", "photo_id"]).to_pandas()
    splits.update(frame["split"].value_counts().to_dict())
    photos = frame.drop_duplicates("photo_id").groupby(["image_type", "split"]).size()
    splits.update({f"{kind}:{split}": int(n) for (kind, split), n in photos.items()})


def _class_map(stats: list[dict[str, Any]]) -> dict[str, Any]:
    infos: dict[str, dict[str, Any]] = {}
    for item in stats:  # chunk order is deterministic, so the first description of a class wins everywhere
        for code, info in item["classes"].items():
            infos.setdefault(code, info)
    return {"classes": [{"index": i, **infos[code], "mapping_code": code} for i, code in enumerate(sorted(infos))]}


def _unlabelled_images(found: Discovery, labelled_folders: set[str]) -> int:
    """Images in code folders that no label folder looks in: a code with no label folder at all, or a partition of
    AI Hub's with photos of a code and no labels of it (the photos a label folder looks in, photo_locations, are
    counted by the workers)."""
    seen = {(folder[:-5], loc) for label, folder, _ in found.label_folders if folder[:-5] in labelled_folders
            for loc in looked_in(found, label, folder[:-5])}
    total = 0
    for folder, locations in found.image_folders.items():
        for loc in locations:
            if (folder, loc) in seen:
                continue
            if loc.is_zip or loc.flat:
                total += found.image_counts.get((loc.container, folder), 0)
            else:
                names = os.listdir(os.path.join(loc.container, folder))
                total += sum(1 for n in names if is_image(n))
    return total


SKIP_REASONS = ("bad_json", "bad_schema", "bad_field", "bad_code", "bad_file_name", "bbox_outside_image",
                "bbox_zero_size", "missing_image", "file_name_mismatch", "code_not_in_folder", "unreadable")
# Counters of the workers that are not skip reasons (kept records, photos, label checks).
_NON_SKIP = {"label_files", "kept", "duplicate_label_files", "duplicate_label_files_across_partitions",
             "image_without_label", "photos_single",
             "photos_combination", "incomplete_gt_photos", "box_issue_rows", "attribute_mismatch",
             "multi_valued_colour", *PHOTO_REASONS}


def _total_counts(stats: list[dict[str, Any]]) -> Counter:
    counts: Counter = Counter()
    for item in stats:
        counts.update(item["counts"])
    return counts


def _skipped(counts: Counter) -> dict[str, int]:
    skipped = {reason: counts.get(reason, 0) for reason in SKIP_REASONS}
    skipped.update({k: v for k, v in counts.items()
                    if k not in skipped and k not in _NON_SKIP and not k.startswith("attribute_mismatch:")})
    return skipped


def _label_checks(counts: Counter) -> dict[str, Any]:
    """Label quality checks: photos per photo-level reason, rows or label files for the others."""
    fields = {k.partition(":")[2]: v for k, v in sorted(counts.items()) if k.startswith("attribute_mismatch:")}
    return {**{reason: counts.get(reason, 0) for reason in PHOTO_REASONS},
            "attribute_mismatch": counts.get("attribute_mismatch", 0), "attribute_mismatch_by_field": fields,
            "multi_valued_colour": counts.get("multi_valued_colour", 0),
            "left_out_of_detection_photos": counts.get("incomplete_gt_photos", 0),
            "left_out_of_classification_rows": counts.get("box_issue_rows", 0)}


def _report(counts: Counter, found: Discovery, labelled: set[str], splits: Counter, n_classes: int,
            meta: dict[str, Any]) -> dict[str, Any]:
    skipped = _skipped(counts)
    return {
        **meta, "layout": layout_of(found), "label_files": counts["label_files"], "records_kept": counts["kept"],
        "records_skipped": sum(skipped.values()), "skipped": skipped, "label_checks": _label_checks(counts),
        "image_without_label": counts["image_without_label"] + _unlabelled_images(found, labelled),
        "photos": {"single": counts["photos_single"], "combination": counts["photos_combination"]},
        "incomplete_gt_photos": counts["incomplete_gt_photos"], "classes": n_classes,
        # what was not read: zips that cannot be opened (their labels and photos are missing from the manifest),
        # and label files found again in a second copy of their folder (read once)
        "unreadable_zips": found.unreadable_zips,
        # folders, zips and files left out because their names are not UTF-8 (a Windows archive's cp949), named
        "names_not_utf8": [shown_path(path) for path in found.not_utf8],
        "duplicate_label_files": counts["duplicate_label_files"],
        "duplicate_label_folders": found.duplicate_folders,
        "duplicate_label_files_across_partitions": counts["duplicate_label_files_across_partitions"],
        "rows_per_split": {k: splits.get(k, 0) for k in ("train", "val", "test")},
        "photos_per_split": {kind: {k: splits.get(f"{kind}:{k}", 0) for k in ("train", "val", "test")}
                             for kind in ("single", "combination")},
    }


def scan_dataset(data_root: str | Path, out_dir: str | Path, workers: int = 0, *, split_seed: int = 42,
                 val_ratio: float = 0.15, test_ratio: float = 0.15, chunk_files: int = 2000,
                 resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Scan an AI Hub tree into manifests under `out_dir`; returns the scan report (also scan_report.json).

    `workers` = 0 uses every usable core (the process's CPU affinity), 1 parses in this process. Bad records are
    skipped and counted by reason, label checks flag records (label_checks). With `resume`, chunks finished by an
    interrupted scan with the same settings are not parsed again. Raises ScanError, a one-line diagnosis, when
    nothing could be kept.
    """
    if not 0 <= val_ratio < 1 or not 0 <= test_ratio < 1 or val_ratio + test_ratio >= 1:
        raise ValueError(f"val_ratio={val_ratio} and test_ratio={test_ratio} must be in [0, 1) with sum < 1")
    start = time.perf_counter()
    out_dir = ensure_dir(out_dir)
    workers = workers or usable_cores()
    pool = None if workers <= 1 else ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                                                         initializer=pool_worker_signals)
    try:
        report = _scan(data_root, out_dir, pool, workers, start, split_seed, val_ratio, test_ratio, chunk_files,
                       resume, progress)
    except KeyboardInterrupt:
        if pool is not None:  # its workers leave Ctrl-C to this process (utils.signals.pool_worker_signals)
            LOGGER.warning("scan interrupted: the chunks being read finish and are kept, so that a rerun resumes "
                           "after them")
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return report


def _scan(data_root: str | Path, out_dir: Path, pool: ProcessPoolExecutor | None, workers: int, start: float,
          split_seed: int, val_ratio: float, test_ratio: float, chunk_files: int, resume: bool,
          progress: bool) -> dict[str, Any]:
    found = discover(data_root, pool)
    LOGGER.info("scan: %s layout under %s", layout_of(found)["name"], data_root)
    if not found.label_folders:
        raise ScanError(diagnose(str(data_root), found) + " (No AI Hub label folders K-XXXXXX_json were found.)")
    tasks = make_tasks(found, chunk_files)
    expected = {"version": STATE_VERSION, "data_root": str(Path(data_root).resolve()), "split_seed": split_seed}
    parts = _prepare_parts(out_dir, expected, resume, {t.task_id for t in tasks})
    _run_tasks(tasks, parts, pool, workers, progress, split_seed)
    part_files = [parts / f"part-{t.task_id}.parquet" for t in tasks]
    stats = [read_json(parts / f"part-{t.task_id}.json") for t in tasks]
    counts = _total_counts(stats)
    meta = {"data_root": expected["data_root"], "split_seed": split_seed, "val_ratio": val_ratio,
            "test_ratio": test_ratio, "workers": workers, "chunks": len(tasks)}
    labelled = {f for item in stats for f in item["folders"]}
    if not counts["kept"]:
        _fail_empty(data_root, out_dir, found, counts, labelled, meta)
    splits_of, meta["split"] = assign_splits(collect_groups(part_files), val_ratio, test_ratio)
    splits = _merge(part_files, out_dir, splits_of)
    class_map = _class_map(stats)
    save_json(out_dir / "class_map.json", class_map)
    seconds = time.perf_counter() - start
    report = _report(counts, found, labelled, splits, len(class_map["classes"]), {**meta, "seconds": round(seconds, 2)})
    report["files_per_second"] = round(report["label_files"] / max(seconds, 1e-9), 1)
    save_json(out_dir / "scan_report.json", report)
    save_json(out_dir / "scan_state.json", {**expected, "status": "complete"})
    shutil.rmtree(parts)  # the merged manifest supersedes the parts
    _log_report(report, seconds)
    return report


def _fail_empty(data_root: str | Path, out_dir: Path, found: Discovery, counts: Counter, labelled: set[str],
                meta: dict[str, Any]) -> None:
    """No record kept: the report (with the diagnosis) is written, the manifest is not, and the scan fails."""
    text = diagnose(str(data_root), found, Counter(_skipped(counts)))
    report = _report(counts, found, labelled, Counter(), 0, meta)
    save_json(out_dir / "scan_report.json", {**report, "diagnosis": text})
    raise ScanError(text)


def _log_report(report: dict[str, Any], seconds: float) -> None:
    LOGGER.info("scan: %d labels, %d kept, %d skipped %s, %d classes, %.1fs", report["label_files"],
                report["records_kept"], report["records_skipped"],
                {k: v for k, v in report["skipped"].items() if v}, report["classes"], seconds)
    checks = report["label_checks"]
    flagged = {k: v for k, v in checks.items() if v and not isinstance(v, dict)}
    if flagged:
        LOGGER.info("scan: label checks %s; photos with broken or missing boxes are left out of detection "
                    "training, pills with a doubtful box out of classification", flagged)
    LOGGER.info("scan: photos per split %s (split groups: %s)", report["photos_per_split"], report["split"])
    if report["duplicate_label_files"]:
        LOGGER.warning("scan: %d label files were found again in another copy of their folder (%d folders: a zip "
                       "kept beside its extracted folder?) and read once", report["duplicate_label_files"],
                       report["duplicate_label_folders"])
    if report["duplicate_label_files_across_partitions"]:
        LOGGER.warning("scan: %d label files have the same name in both AI Hub partitions and were read once, from "
                       "the first copy holding them", report["duplicate_label_files_across_partitions"])
    if report["unreadable_zips"]:
        LOGGER.warning("scan: %d zips could not be read, and their labels and photos are not in the manifest "
                       "(a download cut short? see the warning for each): %s", len(report["unreadable_zips"]),
                       ", ".join(report["unreadable_zips"]))


def manifest_file(manifest_dir: str | Path) -> Path | None:
    """The file load_manifest reads: manifest.parquet, else manifest.csv; None when neither is there."""
    for name in ("manifest.parquet", "manifest.csv"):
        if (path := Path(manifest_dir) / name).is_file():
            return path
    return None


def load_manifest(manifest_dir: str | Path) -> pd.DataFrame:
    """The manifest written by scan_dataset (Parquet, falling back to CSV); error names the missing files."""
    path = manifest_file(manifest_dir)
    if path is None:
        raise FileNotFoundError(f"No manifest.parquet or manifest.csv in {manifest_dir}: run `pillsnap data scan` "
                                "first")
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pandas()
    text = {c: str for c in ("photo_id", "box_issue", "split_group", "aihub_part")}
    return pd.read_csv(path, dtype=text, keep_default_na=False)


def write_manifest_csv(rows: pd.DataFrame, path: str | Path) -> Path:
    """Write manifest rows as a CSV with manifest.csv's columns and formatting (extra columns are dropped)."""
    table = pa.Table.from_pandas(rows[MANIFEST_SCHEMA.names], schema=MANIFEST_SCHEMA, preserve_index=False)
    with atomic_path(Path(path)) as tmp:
        pacsv.write_csv(table, tmp)
    return Path(path)


def load_class_map(manifest_dir: str | Path) -> dict[str, dict[str, Any]]:
    """class_map.json as {mapping_code: entry}."""
    path = Path(manifest_dir) / "class_map.json"
    if not path.is_file():
        raise FileNotFoundError(f"No class_map.json in {manifest_dir}: run `pillsnap data scan` first")
    return {entry["mapping_code"]: entry for entry in read_json(path)["classes"]}
