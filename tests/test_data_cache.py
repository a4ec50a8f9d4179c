"""Crop cache: same pixels as the raw path, incremental, used by the loaders when enabled."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pillsnap.data import build_dataloaders_twostage
from pillsnap.data.cache import CachedCrops, build_cache, cache_root
from pillsnap.data.datasets import pill_crop
from pillsnap.data.scan import load_manifest


def singles(manifest_dir):
    manifest = load_manifest(manifest_dir)
    return manifest[manifest.image_type == "single"]


def test_cache_holds_the_resized_crop(manifest_dir, tmp_path):
    rows = singles(manifest_dir).head(10)
    cache = build_cache(rows, tmp_path, 32, 0.15, workers=1)
    assert len(cache) == 10 and cache.image_size == 32
    row = rows.iloc[3]
    expected = np.asarray(pill_crop(row, 0.15).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(np.asarray(cache.get(row.label_path)), expected)


def test_cache_is_incremental(manifest_dir, tmp_path):
    rows = singles(manifest_dir)
    build_cache(rows.head(5), tmp_path, 24, 0.15, workers=1)
    root = cache_root(tmp_path, 24, 0.15)
    first = (root / "shard_00000.npy").stat().st_mtime_ns
    cache = build_cache(rows.head(12), tmp_path, 24, 0.15, workers=1)
    assert len(cache) == 12 and (root / "shard_00000.npy").stat().st_mtime_ns == first
    assert (root / "shard_00001.npy").is_file() and not (root / "shard_00002.npy").exists()
    assert len(CachedCrops(root)) == 12


def test_loader_reads_from_cache_when_enabled(synth_cfg):
    cfg = OmegaConf.merge(synth_cfg, {"data": {"cache": {"enabled": True}}, "train": {"strategy": "classification"}})
    cls_train = build_dataloaders_twostage(cfg)[0]
    manifest = load_manifest(cfg.paths.manifest_dir)
    sound = (manifest["box_issue"] == "").sum()  # every single pill and every soundly boxed combination pill
    assert cls_train.dataset.cache is not None and len(cls_train.dataset.cache) == sound > 36
    x, y, _ = next(iter(cls_train))
    assert x.shape == (4, 3, 32, 32)
    plain = build_dataloaders_twostage(synth_cfg)[1]
    cached = build_dataloaders_twostage(cfg)[1]
    xa, _, ia = next(iter(plain))
    xb, _, ib = next(iter(cached))
    assert ia["image_path"] == ib["image_path"] and (xa - xb).abs().mean() < 0.05  # val: no augmentation


def test_unknown_cache_format_is_a_clear_error(synth_cfg):
    import pytest

    cfg = OmegaConf.merge(synth_cfg, {"data": {"cache": {"enabled": True, "format": "lmdb"}}})
    with pytest.raises(ValueError, match="data.cache.format='lmdb'"):
        build_dataloaders_twostage(cfg)


def test_a_subset_of_a_cached_dataset_reads_its_own_rows_crops(manifest_dir, tmp_path):
    """The dataset looks its rows' cache slots up once; a subset (the evaluation view, the scale rehearsal's
    capped validation) must carry them along with the rows, or it serves other rows' crops under these labels."""
    from pillsnap.data.datasets import ClassificationDataset

    rows = singles(manifest_dir).head(9)
    cache = build_cache(rows, tmp_path, 24, 0.15, workers=1)
    index = {code: i for i, code in enumerate(sorted(rows["mapping_code"].unique()))}
    dataset = ClassificationDataset(rows, index, 24, False, 0.15, cache)
    part = dataset.subset(np.arange(9)[::3])
    assert [r.label_path for r in part.rows] == list(rows["label_path"].iloc[::3])
    for i, row in enumerate(part.rows):
        assert np.array_equal(np.asarray(part.load_crop(i)), np.asarray(cache.get(row.label_path)))
        assert part.labels[i] == index[row.mapping_code]


def test_a_second_builder_waits_for_the_first_and_adds_only_what_is_missing(manifest_dir, tmp_path, caplog):
    """Two experiments share paths.cache_dir by default: two builders at once numbered their shards from the same
    index and wrote over each other's, so an index could name another row's crop under a label."""
    import threading

    from pillsnap.data.cache import BUILD_LOCK, _add_missing
    from pillsnap.utils.locks import file_lock

    caplog.set_level("INFO", logger="pillsnap.data.cache")
    rows = singles(manifest_dir)
    root = cache_root(tmp_path, 24, 0.15)
    built = []
    waiter = threading.Thread(target=lambda: built.append(build_cache(rows.head(12), tmp_path, 24, 0.15, workers=1)))
    with file_lock(root / BUILD_LOCK, role="cache"):  # another run is adding its crops
        waiter.start()
        waiter.join(timeout=3)
        assert waiter.is_alive() and not built  # it waits instead of writing beside the other
        _add_missing(rows.head(5), root, 24, 0.15, workers=1, progress=False)  # what the other run adds
    waiter.join(timeout=60)
    assert built and len(built[0]) == 12
    assert "is being added to by another process" in caplog.text
    assert len(np.load(root / "shard_00000.npy", mmap_mode="r")) == 5  # the other's shard, kept
    assert len(np.load(root / "shard_00001.npy", mmap_mode="r")) == 7  # only what was still missing
    for row in rows.head(12).itertuples():
        expected = np.asarray(pill_crop(row, 0.15).resize((24, 24), Image.BILINEAR))
        assert np.array_equal(np.asarray(built[0].get(row.label_path)), expected)


def test_a_complete_cache_is_read_without_writing_and_an_incomplete_read_only_one_is_named(manifest_dir, tmp_path,
                                                                                          monkeypatch):
    import os

    import pytest

    rows = singles(manifest_dir)
    build_cache(rows.head(6), tmp_path, 24, 0.15, workers=1)
    root = cache_root(tmp_path, 24, 0.15)
    (root / "build.lock").unlink()
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else writable(path, mode))
    assert len(build_cache(rows.head(6), tmp_path, 24, 0.15, workers=1)) == 6  # a teammate's cache, read only
    assert not (root / "build.lock").exists()
    with pytest.raises(ValueError, match="lacks crops of these rows and its folder cannot be written"):
        build_cache(rows.head(8), tmp_path, 24, 0.15, workers=1)


def test_a_stop_to_the_whole_group_during_a_cache_build_ends_it_quietly(manifest_dir, tmp_path):
    """Training builds the cache under its stop handlers (stops_as_interrupt), and a stop sent to the whole process
    group (`timeout`, SLURM) reaches the pool's workers too. Inheriting the trainer's handlers, each printed a
    KeyboardInterrupt traceback; killed at once instead, one holding the pool's queue lock would leave the trainer
    waiting for it for good. The workers now leave quietly and the build ends as interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import sys, time
import pandas as pd
from pillsnap.data import cache
from pillsnap.data.scan import load_manifest
from pillsnap.utils.signals import stops_as_interrupt

crop = cache._CropJob.__call__
cache._CropJob.__call__ = lambda job, row: (time.sleep(0.02), crop(job, row))[1]  # a build that takes a while
from pillsnap.utils import pools
start = pools.pool_worker_signals
pools.pool_worker_signals = lambda: (start(), print("worker", flush=True))  # says when a worker is ready
rows = load_manifest({str(manifest_dir)!r})
rows = pd.concat([rows.assign(label_path=rows["label_path"] + f"#{{i}}") for i in range(20)], ignore_index=True)
print("building", flush=True)
try:
    with stops_as_interrupt():
        cache.build_cache(rows, {str(tmp_path)!r}, 24, 0.15, workers=2)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("built", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "building", proc.stderr.read()
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["worker", "worker"], proc.stderr.read()
        time.sleep(0.5)  # both workers cutting crops
        os.killpg(proc.pid, signal.SIGTERM)  # the builder and its workers
        out, err = proc.communicate(timeout=60)
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no worker is left behind
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert out.split() == ["interrupted"] and proc.returncode == 130, (out, err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]


def test_a_photo_that_cannot_be_decoded_is_recorded_and_a_read_only_cache_lacking_only_it_is_used(
        manifest_dir, tmp_path, monkeypatch, caplog):
    """At full scale a few photos of millions are broken. The cache kept no record of the rows it could not cut:
    a teammate's read-only cache lacking only their crops was refused outright (and the log counted them as
    added). Now they are recorded, a read-only cache lacking no more than a sliver of the rows as unreadable is
    used, and a build that can write tries them again."""
    import os
    import shutil

    import pillsnap.data.cache as cache_module
    from pillsnap.data.datasets import ClassificationDataset

    rows = singles(manifest_dir).head(6).copy()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good_photo = rows.iloc[2]["image_path"]
    rows.iloc[2, rows.columns.get_loc("image_path")] = str(broken)
    key = rows.iloc[2]["label_path"]
    caplog.set_level("INFO", logger="pillsnap.data.cache")
    cache = build_cache(rows, tmp_path, 24, 0.15, workers=1)
    assert len(cache) == 5 and cache.unreadable == {key} and key not in cache
    assert "5 crops added (5 in all); 1 could not be cut, their 1 photos undecodable" in caplog.text
    index = {code: i for i, code in enumerate(sorted(rows["mapping_code"].unique()))}
    dataset = ClassificationDataset(rows, index, 24, False, 0.15, cache)
    assert dataset[2] is None and dataset[3] is not None  # training leaves it out, and only it

    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else writable(path, mode))
    with pytest.raises(ValueError, match=r"1 of these rows \(16.7%\) have no crop .* more than the 1% a cache may"):
        build_cache(rows, tmp_path, 24, 0.15, workers=1)  # 1 of 6 rows: more than a sliver
    monkeypatch.setattr(cache_module, "UNREADABLE_LIMIT", 0.2)  # as 1 of 100 rows would be at the default 1 %
    caplog.clear()
    read_only = build_cache(rows, tmp_path, 24, 0.15, workers=1)  # a teammate's cache: used, the row named
    assert len(read_only) == 5 and "cannot be written, and 1 of these rows have no crop in it" in caplog.text
    with pytest.raises(ValueError, match="lacks crops of these rows"):  # a row never tried still needs a build
        build_cache(singles(manifest_dir).head(8), tmp_path, 24, 0.15, workers=1)

    monkeypatch.setattr(os, "access", writable)
    shutil.copyfile(good_photo, broken)  # the photo fetched again: the next build that can write takes it
    mended = build_cache(rows, tmp_path, 24, 0.15, workers=1)
    assert len(mended) == 6 and not mended.unreadable
    expected = np.asarray(pill_crop(rows.iloc[2], 0.15).resize((24, 24), Image.BILINEAR))
    assert np.array_equal(np.asarray(mended.get(key)), expected)


def test_a_cache_built_while_no_photo_could_be_read_records_them_and_is_not_taken_read_only(
        manifest_dir, tmp_path, monkeypatch, caplog):
    """Built while the photos were out of reach (a share not mounted), every row is unreadable: recorded as such,
    and a reader that cannot write is refused instead of training on nothing."""
    import os

    from pillsnap.data.cache import UNREADABLE_LIMIT
    from pillsnap.eval.criteria import ADVISOR

    assert ADVISOR.max_corruption_rate == UNREADABLE_LIMIT  # the share of unreadable data a stage tolerates
    rows = singles(manifest_dir).head(4).copy()
    rows["image_path"] = str(tmp_path / "not_mounted" / "photo.png")
    caplog.set_level("INFO", logger="pillsnap.data.cache")
    cache = build_cache(rows, tmp_path, 24, 0.15, workers=1)
    root = cache_root(tmp_path, 24, 0.15)
    assert len(cache) == 0 and CachedCrops(root).unreadable == set(rows["label_path"])
    assert "4 of the 4 rows asked could not be cut" in caplog.text  # a warning, not only the count
    before = (root / "index.parquet").stat().st_ino  # the index is replaced whole when it is written
    build_cache(rows, tmp_path, 24, 0.15, workers=1)  # tried again, nothing changed: the index is left alone
    assert (root / "index.parquet").stat().st_ino == before
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else writable(path, mode))
    with pytest.raises(ValueError, match="4 of these rows .*were the photos out of reach then"):
        build_cache(rows, tmp_path, 24, 0.15, workers=1)


def test_jpeg_cache_holds_the_crop_within_a_grey_level_in_its_own_folder(manifest_dir, tmp_path):
    """Stages 3-4 cache their crops as JPEGs (13x smaller than npy): the same crop, to JPEG's rounding, and the two
    formats never share a folder, so switching formats never reads one as the other."""
    from pillsnap.data.cache import JPEG_QUALITY

    rows = singles(manifest_dir).head(10)
    npy = build_cache(rows, tmp_path, 48, 0.15, workers=1)
    jpeg = build_cache(rows, tmp_path, 48, 0.15, workers=1, fmt="jpeg")
    assert jpeg.root == cache_root(tmp_path, 48, 0.15, "jpeg") != npy.root
    assert jpeg.root.name.endswith(f"_jpeg{JPEG_QUALITY}") and jpeg.format == "jpeg" and npy.format == "npy"
    assert sorted(p.name for p in jpeg.root.glob("shard_*")) == ["shard_00000.jpegs"]
    assert len(jpeg) == 10 and set(jpeg.index) == set(npy.index)
    sizes = [slot[2] for slot in jpeg.index.values()]
    assert sum(sizes) == (jpeg.root / "shard_00000.jpegs").stat().st_size
    assert sum(sizes) < 10 * 48 * 48 * 3 / 2  # well under the npy cache's bytes
    for key in rows["label_path"]:
        a, b = np.asarray(npy.get(key), float), np.asarray(jpeg.get(key), float)
        assert b.shape == (48, 48, 3) and 0 < np.abs(a - b).mean() < 2.5  # JPEG, not a copy, and close to it


def test_a_dataset_reads_the_jpeg_cache_and_drops_a_damaged_crop(manifest_dir, tmp_path):
    from pillsnap.data.datasets import ClassificationDataset

    rows = singles(manifest_dir).head(8)
    cache = build_cache(rows.head(5), tmp_path, 32, 0.15, workers=1, fmt="jpeg")
    first = (cache.root / "shard_00000.jpegs").stat().st_mtime_ns
    cache = build_cache(rows, tmp_path, 32, 0.15, workers=1, fmt="jpeg")  # incremental: a second shard
    assert (cache.root / "shard_00000.jpegs").stat().st_mtime_ns == first and len(cache) == 8
    assert (cache.root / "shard_00001.jpegs").is_file()
    index = {code: i for i, code in enumerate(sorted(rows["mapping_code"].unique()))}
    dataset = ClassificationDataset(rows, index, 32, False, 0.15, cache)
    assert dataset.cache_slots.shape == (8, 3) and all(dataset[i] is not None for i in range(8))
    shard, offset, nbytes = cache.index[rows["label_path"].iloc[6]]
    with open(cache.root / f"shard_{shard:05d}.jpegs", "r+b") as fh:  # a damaged disk block
        fh.seek(offset)
        fh.write(b"\0" * nbytes)
    again = ClassificationDataset(rows, index, 32, False, 0.15, CachedCrops(cache.root))
    assert again[6] is None and again[7] is not None and again[5] is not None
    with pytest.raises(OSError, match="shard_00001.jpegs at byte .*rebuild the cache"):
        again.load_crop(6)


def test_a_jpeg_cache_checks_the_disk_before_each_shard_at_the_mean_size_so_far(manifest_dir, tmp_path,
                                                                                monkeypatch):
    """A JPEG's size is known once it is encoded: the first shard's crops size the whole build, with room to
    spare, before a byte is written; each later shard checks the crops left at the mean size so far, and a build
    stopped there keeps its shards for the next one."""
    from pillsnap.data import cache as cache_module
    from pillsnap.utils.io import DiskSpaceError

    calls = []

    def disk(refuse_at: int):
        def check(directory, need, what, remedy):
            calls.append((need, what))
            if len(calls) == refuse_at:
                raise DiskSpaceError(f"{what} needs {need} bytes")
        return check

    monkeypatch.setattr(cache_module, "SHARD_ROWS", 4)
    rows = singles(manifest_dir).head(10)
    root = cache_root(tmp_path, 32, 0.15, "jpeg")
    monkeypatch.setattr(cache_module, "check_free_space", disk(refuse_at=1))
    with pytest.raises(DiskSpaceError, match="10 crops of 32 px; .* KB a crop in the 4 encoded so far"):
        build_cache(rows, tmp_path, 32, 0.15, workers=1, fmt="jpeg")
    assert not list(root.glob("shard_*")) and not (root / "index.parquet").exists()  # nothing written
    calls.clear()
    monkeypatch.setattr(cache_module, "check_free_space", disk(refuse_at=2))
    with pytest.raises(DiskSpaceError, match="6 crops of 32 px; .* KB a crop in the 8 encoded so far"):
        build_cache(rows, tmp_path, 32, 0.15, workers=1, fmt="jpeg")
    assert len(CachedCrops(root)) == 4  # the first shard stays, indexed
    calls.clear()
    monkeypatch.setattr(cache_module, "check_free_space", disk(refuse_at=0))
    cache = build_cache(rows, tmp_path, 32, 0.15, workers=1, fmt="jpeg")  # adds the 6 left: two shards
    assert len(cache) == 10 and [int(what.split("(")[1].split()[0]) for _, what in calls] == [6, 2]
    sizes = [cache.index[k][2] for k in rows["label_path"]]
    mean_first = sum(sizes[4:8]) / 4
    assert calls[0][0] == int(6 * (mean_first * cache_module.JPEG_SIZE_SPARE))


def test_stages_3_and_4_read_a_jpeg_cache_unless_the_command_line_says_otherwise(synth_cfg):
    from pillsnap.config import apply_stage_overrides, load_config

    for stage in (3, 4):
        staged = apply_stage_overrides(synth_cfg, stage)
        assert staged.data.cache.enabled is True and staged.data.cache.format == "jpeg"
    assert apply_stage_overrides(synth_cfg, 2).data.cache.enabled is False
    given = load_config(None, ["data.cache.format=npy", "data.progressive_validation.current_stage=3"],
                        dotenv_path=None)
    kept = apply_stage_overrides(given, 3)
    assert kept.data.cache.enabled is True and kept.data.cache.format == "npy"  # the command line wins
    staged = apply_stage_overrides(synth_cfg, 3)
    staged.data.progressive_validation.current_stage = 3
    staged.dataloader.num_workers = 0  # the stage's 8 workers are not what this test is about
    loaders = build_dataloaders_twostage(OmegaConf.merge(staged, {"train": {"strategy": "classification"}}))
    train = loaders[0].dataset
    assert train.cache is not None and train.cache.format == "jpeg" and train.cache_slots.shape[1] == 3
    x, _, _ = next(iter(loaders[0]))
    assert x.shape == (4, 3, 32, 32)


def test_stages_3_and_4_export_the_detector_photos_as_resized_jpegs(synth_cfg):
    from pillsnap.config import apply_stage_overrides
    from pillsnap.data.loaders import _yolo_dir

    assert synth_cfg.data.detection_export == "photos" and _yolo_dir(synth_cfg).name == "yolo_stage_1"
    staged = apply_stage_overrides(synth_cfg, 3)
    staged.data.progressive_validation.current_stage = 3
    assert staged.data.detection_export == "jpeg" and _yolo_dir(staged).name == "yolo_stage_3_jpeg64"


@pytest.mark.parametrize("fmt", ["npy", "jpeg"])
def test_a_row_whose_box_changed_is_cut_again_and_a_read_only_cache_then_refused(manifest_dir, tmp_path, fmt,
                                                                                 monkeypatch):
    """A label file corrected under the same name (AI Hub's misplaced boxes fixed in a later release) must not keep
    serving the crop cut at the old box."""
    import os

    from pillsnap.data.cache import CacheError

    rows = singles(manifest_dir).head(6).reset_index(drop=True)
    cache = build_cache(rows, tmp_path, 32, 0.15, workers=1, fmt=fmt)
    key = rows.label_path.iloc[2]
    old = np.asarray(cache.get(key), float)
    others = {k: cache.index[k] for k in rows.label_path if k != key}
    moved = rows.copy()
    moved.loc[2, "bbox_x"] += moved.loc[2, "bbox_w"] // 2
    assert cache.cut_elsewhere(moved).tolist() == [False, False, True, False, False, False]
    again = build_cache(moved, tmp_path, 32, 0.15, workers=1, fmt=fmt)
    expected = np.asarray(pill_crop(moved.iloc[2], 0.15).resize((32, 32), Image.BILINEAR), float)
    assert np.abs(np.asarray(again.get(key), float) - expected).mean() < 2.5 < np.abs(old - expected).mean()
    assert {k: again.index[k] for k in others} == others and not again.cut_elsewhere(moved).any()
    assert not CachedCrops(again.root).cut_elsewhere(moved).any()  # kept in the index for the next build
    assert not build_cache(moved, tmp_path, 32, 0.15, workers=1, fmt=fmt).cut_elsewhere(moved).any()
    writable = os.access  # a teammate's cache, read only: the row's crop is out of date and cannot be cut again
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else writable(path, mode))
    with pytest.raises(CacheError, match="lacks crops of these rows and its folder cannot be written"):
        build_cache(rows, tmp_path, 32, 0.15, workers=1, fmt=fmt)
    assert len(build_cache(moved, tmp_path, 32, 0.15, workers=1, fmt=fmt)) == 6  # up to date: read as it is


def test_a_rebuild_of_moved_boxes_stopped_part_way_leaves_no_old_crop_under_a_new_box(manifest_dir, tmp_path,
                                                                                         monkeypatch):
    from pillsnap.data import cache as cache_module

    rows = singles(manifest_dir).head(6).reset_index(drop=True)
    build_cache(rows, tmp_path, 24, 0.15, workers=1, fmt="jpeg")
    moved = rows.copy()
    moved.loc[:3, "bbox_x"] += moved.loc[:3, "bbox_w"] // 2
    monkeypatch.setattr(cache_module, "SHARD_ROWS", 2)
    real, calls = cache_module._write_shard, []

    def stopped(*args):  # the second shard's write is where the run was killed
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache_module, "_write_shard", stopped)
    with pytest.raises(KeyboardInterrupt):
        build_cache(moved, tmp_path, 24, 0.15, workers=1, fmt="jpeg")
    half = CachedCrops(cache_root(tmp_path, 24, 0.15, "jpeg"))
    assert len(half) == 4 and not half.cut_elsewhere(moved[moved.label_path.isin(half.index)]).any()
    monkeypatch.setattr(cache_module, "_write_shard", real)
    done = build_cache(moved, tmp_path, 24, 0.15, workers=1, fmt="jpeg")
    assert len(done) == 6 and not done.cut_elsewhere(moved).any()
    for i in range(4):
        expected = np.asarray(pill_crop(moved.iloc[i], 0.15).resize((24, 24), Image.BILINEAR), float)
        assert np.abs(np.asarray(done.get(moved.label_path.iloc[i]), float) - expected).mean() < 3


def test_an_index_from_before_boxes_were_kept_trusts_its_crops_and_learns_them_at_its_next_build(manifest_dir,
                                                                                                   tmp_path):
    import pandas as pd

    rows = singles(manifest_dir).head(4).reset_index(drop=True)
    cache = build_cache(rows.head(3), tmp_path, 24, 0.15, workers=1)
    index = cache.root / "index.parquet"
    pd.read_parquet(index)[["key", "shard", "offset"]].to_parquet(index, index=False)  # an older PillSnap's
    assert not CachedCrops(cache.root).cut_elsewhere(rows).any()
    slots = dict(CachedCrops(cache.root).index)
    grown = build_cache(rows, tmp_path, 24, 0.15, workers=1)  # adds row 3 only, the others as they were
    assert {k: grown.index[k] for k in slots} == slots and len(grown) == 4
    saved = pd.read_parquet(index).set_index("key")
    assert saved.loc[rows.label_path.iloc[3], "bbox_w"] == rows.bbox_w.iloc[3]
    assert saved.loc[rows.label_path.iloc[0], ["bbox_x", "bbox_w"]].isna().all()  # not known: still trusted
