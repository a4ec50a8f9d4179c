"""Loaders: batch formats, meta, test loaders only on request, safe_collate, transform, weights, autotune."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pillsnap.data import (
    ClassificationDataset,
    autotune_num_workers,
    build_dataloaders_twostage,
    classification_transform,
    compute_class_weights,
    crop_box,
    read_image,
    safe_collate,
)
from pillsnap.data.datasets import normalise
from pillsnap.data.scan import load_manifest
from pillsnap.engine.classification import to_input


def test_classification_batches_and_meta(synth_cfg):
    cls_train, cls_val, cls_test, det_train, det_val, det_test, meta = build_dataloaders_twostage(synth_cfg)
    x, y, info = next(iter(cls_train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64  # normalised on the device
    assert set(info) == {"image_path", "mapping_code"} and len(info["mapping_code"]) == 4
    assert [meta["class_names"][i] for i in y.tolist()] == info["mapping_code"]
    assert meta["num_classes"] == 6 and meta["class_names"] == sorted(meta["class_names"])
    assert meta["class_map"][meta["class_names"][2]]["index"] == 2 and meta["class_weights"] is None
    assert cls_test is None and det_test is None and cls_val is not None
    manifest = load_manifest(synth_cfg.paths.manifest_dir)
    sound = manifest[manifest["box_issue"] == ""]
    for split in ("train", "val"):  # single-pill crops plus the combination pills (data.combo_crops)
        assert meta["sizes"][f"cls_{split}"] == (sound["split"] == split).sum()
        combos = sound[(sound["split"] == split) & (sound["image_type"] == "combination")]
        assert meta["sizes"][f"cls_{split}_from_combinations"] == len(combos)
    assert meta["sizes"]["cls_train_from_combinations"] > 0
    assert meta["yolo_data_yaml"].endswith("data.yaml") and meta["stage"] == 1
    assert det_train is not None and len(det_train.dataset) == meta["sizes"]["det_train"]


def test_detection_batch_is_the_ultralytics_dict(synth_cfg):
    det_train = build_dataloaders_twostage(synth_cfg)[3]
    batch = next(iter(det_train))
    assert batch["img"].dtype == torch.uint8 and batch["img"].shape[1:] == (3, 64, 64)
    assert batch["bboxes"].shape[1] == 4 and batch["bboxes"].max() <= 1.0
    assert (batch["cls"] == 0).all() and len(batch["batch_idx"]) == len(batch["cls"])
    assert {"im_file", "ori_shape", "resized_shape"} <= set(batch)


def test_test_loaders_only_on_request_and_strategy_classification(synth_cfg):
    out = build_dataloaders_twostage(synth_cfg, build_test=True)
    manifest = load_manifest(synth_cfg.paths.manifest_dir)
    test_rows = (manifest["split"] == "test") & (manifest["box_issue"] == "")
    assert out[2] is not None and len(out[2].dataset) == test_rows.sum()
    cfg = OmegaConf.merge(synth_cfg, {"train": {"strategy": "classification"}, "loss": {"use_class_weights": True}})
    out = build_dataloaders_twostage(cfg)
    assert out[3] is None and out[4] is None and out[6]["yolo_data_yaml"] is None
    assert out[6]["class_weights"].shape == (6,)


def test_read_image_from_zip_and_error_names_path(synth_root, tmp_path):
    png = next(synth_root.rglob("K-*_0_*.png"))
    with zipfile.ZipFile(tmp_path / "TS_1.zip", "w") as zf:
        zf.write(png, f"K-000001/{png.name}")
    image = read_image(f"zip:{tmp_path / 'TS_1.zip'}!K-000001/{png.name}")
    assert image.mode == "RGB" and image.size == Image.open(png).size
    with pytest.raises(OSError, match="missing.png"):
        read_image(str(tmp_path / "missing.png"))


def four_crops_one_broken(manifest_dir: Path, tmp_path: Path, at: int) -> tuple[ClassificationDataset, Path]:
    """A data set of 4 single-pill crops whose `at`-th photo is not a PNG, and that photo."""
    rows = load_manifest(manifest_dir)
    rows = rows[rows.image_type == "single"].head(4).copy()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.iloc[at, rows.columns.get_loc("image_path")] = str(broken)
    ds = ClassificationDataset(rows, {c: i for i, c in enumerate(sorted(rows.mapping_code.unique()))}, 32, False)
    return ds, broken


def test_safe_collate_drops_undecodable_samples(manifest_dir, tmp_path, caplog):
    ds, broken = four_crops_one_broken(manifest_dir, tmp_path, 1)
    batch = safe_collate([ds[i] for i in range(4)])
    assert batch[0].shape == (3, 3, 32, 32) and str(broken) not in batch[2]["image_path"]
    assert "broken.png" in caplog.text
    assert safe_collate([None, None]) is None


def test_a_training_batch_keeps_its_size_when_a_photo_is_undecodable(synth_cfg, manifest_dir, tmp_path):
    """A compiled model has static shapes: a training batch one sample short would compile it again (minutes at
    max-autotune, with the other DDP ranks waiting). Copies of the readable samples fill it; validation keeps each
    crop once."""
    cls_train, cls_val = build_dataloaders_twostage(synth_cfg)[:2]
    ds, broken = four_crops_one_broken(manifest_dir, tmp_path, 2)
    samples = [ds[i] for i in range(4)]
    images, labels, info = cls_train.collate_fn(samples)
    assert images.shape == (4, 3, 32, 32) and str(broken) not in info["image_path"]
    assert info["image_path"][3] == info["image_path"][0] and torch.equal(images[3], images[0])
    assert cls_val.collate_fn(samples)[0].shape == (3, 3, 32, 32)
    assert cls_train.collate_fn([None] * 4) is None  # nothing to copy: the trainer skips the step
    assert cls_train.collate_fn([samples[0], None, None, None]) is None  # one sample would weigh four times
    assert cls_val.collate_fn([samples[0], None, None, None])[0].shape == (1, 3, 32, 32)


def test_classification_transform_is_normalised():
    image = Image.new("RGB", (50, 70), (124, 116, 104))  # ~ ImageNet mean colour
    x = classification_transform(48, train=False)(image)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and x.abs().max() < 0.05
    y = classification_transform(48, train=True)(image)
    assert y.shape == (3, 48, 48) and y.dtype == torch.uint8  # pixels: the device normalises them
    assert normalise(y).dtype == torch.float32 and normalise(y)[:, 20:28, 20:28].abs().max() < 0.6  # jittered colour


def test_training_crops_are_normalised_on_the_device_as_evaluation_normalises_them():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    evaluated = classification_transform(40, train=False)(Image.fromarray(pixels))  # no resize at its own size
    raw = torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous()
    for channels_last in (False, True):
        x = to_input(raw, torch.device("cpu"), channels_last)
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.allclose(x[0], evaluated, atol=1e-5)
    assert to_input(evaluated[None], torch.device("cpu"), False).data_ptr() == evaluated.data_ptr()  # float: as it is


def colourful(size: int = 64) -> Image.Image:
    """Every hue at several saturations and brightnesses: where a hue shift shows."""
    y, x = np.mgrid[0:size, 0:size] / size
    hsv = np.stack([x, 0.3 + 0.7 * y, 0.4 + 0.6 * (1 - y)], -1)
    return Image.fromarray((hsv * 255).astype(np.uint8), "HSV").convert("RGB")


@pytest.mark.parametrize("hue", [0.02, -0.02, 0.3, -0.45])
def test_shift_hue_turns_the_hue_as_torchvision_does(hue):
    from torchvision.transforms import functional as TF

    from pillsnap.data.datasets import shift_hue

    image = colourful()
    ours, theirs = np.asarray(shift_hue(image, hue), float), np.asarray(TF.adjust_hue(image, hue), float)
    unturned = np.abs(np.asarray(image, float) - theirs).mean()
    assert np.abs(ours - theirs).mean() < min(1.5, unturned / 2)  # the same turn, to a grey level or so
    assert shift_hue(image.convert("L"), hue).mode == "L"  # a grey image has no hue: left to torchvision


def test_colour_jitter_draws_as_torchvisions_and_differs_only_by_the_hue_rounding():
    """The same random numbers give the same factors in the same order: training with it is torchvision's jitter
    (which spent half of a cached crop's time in PIL's HSV conversion), not another augmentation."""
    from torchvision import transforms as T

    from pillsnap.data.datasets import ColorJitter

    image = colourful()
    for seed in range(6):
        torch.manual_seed(seed)
        theirs = np.asarray(T.ColorJitter(0.2, 0.2, 0.15, 0.02)(image), float)
        after_theirs = torch.rand(1)
        torch.manual_seed(seed)
        ours = np.asarray(ColorJitter(0.2, 0.2, 0.15, 0.02)(image), float)
        assert torch.equal(torch.rand(1), after_theirs)
        assert np.abs(ours - theirs).mean() < 1.5 and np.abs(ours - np.asarray(image, float)).mean() > 2
    assert any(isinstance(step, ColorJitter) for step in classification_transform(48, train=True).transforms)


def test_colour_jitter_turns_the_hue_through_opencv(monkeypatch):
    from pillsnap.data import datasets

    turned = []
    monkeypatch.setattr(datasets, "shift_hue", lambda image, factor: turned.append(factor) or image)
    datasets.ColorJitter(hue=0.02)(colourful())
    assert len(turned) == 1 and abs(turned[0]) <= 0.02


def test_crop_box_is_square_with_margin_and_inside():
    assert crop_box(100, 100, (40, 40, 20, 10), 0.5) == (30, 25, 70, 65)
    left, top, right, bottom = crop_box(100, 120, (90, 0, 10, 30), 0.15)
    assert right - left == bottom - top and left >= 0 and right <= 100 and top == 0


def test_compute_class_weights():
    w = compute_class_weights([0, 0, 0, 1, 2, 2], 4)
    assert w[3] == 0 and w[1] > w[2] > w[0] and torch.isclose(w[:3].mean(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="labels"):
        compute_class_weights([5], 4)


class FakeLoader:
    def __init__(self, delay_per_batch: float) -> None:
        self.delay = delay_per_batch

    def __iter__(self):
        import time
        for _ in range(3):
            time.sleep(self.delay)
            yield 0


class FakeTB:
    def __init__(self) -> None:
        self.scalars: dict[str, list] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((value, step))


def test_autotune_picks_the_fastest_candidate(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    delays = {4: 0.004, 8: 0.0005, 12: 0.003, 32: 0.0}
    tb = FakeTB()
    best = autotune_num_workers(lambda n: FakeLoader(delays[n]), [4, 8, 12, 32], warmup=1, steps=4, tb=tb)
    assert best == 8  # 32 exceeds the core count and is not tried
    assert tb.scalars["perf/num_workers"] == [(8, 0)]
    assert len(tb.scalars["perf/autotune_data_time_ms"]) == 3
    tried: list[int] = []  # interleaved: two training loaders share the 16 cores, so 12 is not tried either
    autotune_num_workers(lambda n: tried.append(n) or FakeLoader(delays[n]), [4, 8, 12, 32], warmup=1, steps=4,
                         loaders_together=2)
    assert tried == [4, 8]


def test_the_detector_also_sees_single_pill_photos_in_train_and_val_only(synth_cfg):
    from pillsnap.data.loaders import detection_singles
    from pillsnap.data.yolo import count_images

    manifest = load_manifest(synth_cfg.paths.manifest_dir)
    picked = detection_singles(manifest, 1.0, seed=0)
    assert set(picked["image_type"]) == {"single"} and set(picked["split"]) <= {"train", "val"}
    for split in ("train", "val"):
        combos = manifest[(manifest["split"] == split) & (manifest["image_type"] == "combination")]
        singles = manifest[(manifest["split"] == split) & (manifest["image_type"] == "single")]
        wanted = min(combos["image_path"].nunique(), singles["image_path"].nunique())
        assert picked.loc[picked["split"] == split, "image_path"].nunique() == wanted
    assert picked.equals(detection_singles(manifest, 1.0, seed=0))  # the same photos every time
    assert detection_singles(manifest, 0.0, seed=0).empty

    data_yaml = build_dataloaders_twostage(synth_cfg)[6]["yolo_data_yaml"]
    combos = manifest[manifest["image_type"] == "combination"]
    sound = combos[~combos["incomplete_gt"].astype(bool)]
    share = float(synth_cfg.data.detection_singles)
    expected = sound[sound["split"] == "train"]["image_path"].nunique() + int(round(
        share * combos[combos["split"] == "train"]["image_path"].nunique()))
    assert count_images(data_yaml, "train") == expected
    assert count_images(data_yaml, "test") == sound[sound["split"] == "test"]["image_path"].nunique()


def test_evaluation_view_draws_up_to_per_class_rows_of_every_class_once():
    """The calibration fits its class Gaussians on `evaluation_view(per_class)` of the training crops; at the last
    stage that is 5,000 classes over ~350,000 rows, drawn in one shuffle and sort instead of a mask per class."""
    import numpy as np
    import pandas as pd

    from pillsnap.data.datasets import ClassificationDataset

    rng = np.random.default_rng(0)
    codes = [f"K-{i:06d}" for i in rng.integers(0, 40, 900)] + ["K-000999"]  # one class with a single row
    rows = pd.DataFrame({"image_path": [f"/p/{i}.png" for i in range(len(codes))], "mapping_code": codes,
                         "label_path": [f"/l/{i}.json" for i in range(len(codes))], "bbox_x": 0, "bbox_y": 0,
                         "bbox_w": 4, "bbox_h": 4})
    index = {c: i for i, c in enumerate(sorted(set(codes)))}
    dataset = ClassificationDataset(rows, index, 32, train=True)
    view = dataset.evaluation_view(per_class=5, seed=1)
    counts, full = np.bincount(view.labels, minlength=len(index)), np.bincount(dataset.labels, minlength=len(index))
    assert (counts == np.minimum(full, 5)).all()
    paths = [r.image_path for r in view.rows]
    assert len(set(paths)) == len(paths) and paths == sorted(paths, key=lambda p: int(p[3:-4]))  # manifest order
    assert all(index[r.mapping_code] == label for r, label in zip(view.rows, view.labels, strict=True))
    assert [r.image_path for r in dataset.evaluation_view(5, seed=1).rows] == paths  # deterministic by seed
    assert [r.image_path for r in dataset.evaluation_view(5, seed=2).rows] != paths
    assert len(dataset.evaluation_view().rows) == len(codes)


def test_loader_workers_are_capped_to_this_ranks_share_of_the_cores(monkeypatch):
    from pillsnap.data import loaders

    monkeypatch.setattr("os.cpu_count", lambda: 64)  # the host's: a container may use fewer
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loaders.workers_for_this_rank(8) == 4 and loaders.workers_for_this_rank(2) == 2
    assert loaders.workers_for_this_rank(8, loaders_together=2) == 2  # interleaved: both models' loaders at once
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loaders.workers_for_this_rank(8) == 8 and loaders.workers_for_this_rank(0) == 0
    assert loaders.workers_for_this_rank(16, loaders_together=2) == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set())
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert loaders.workers_for_this_rank(8) == 1


def test_the_default_eight_workers_are_capped_for_the_passes_after_training_too(monkeypatch):
    """The default is the design's 8 loader workers; a laptop's 2 cores get 2, for training and for the
    calibration and evaluation passes alike."""
    from pillsnap.config import load_config
    from pillsnap.eval.outputs import eval_loader

    cfg = load_config(None, dotenv_path=None)
    assert cfg.dataloader.num_workers == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert eval_loader(list(range(10)), cfg).num_workers == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert eval_loader(list(range(10)), cfg).num_workers == 8


def test_crop_table_rows_as_the_former_list_gave_them():
    """The dataset's rows live in columns (no per-row Python objects for forked workers to copy); indexing answers
    as a list of rows did: ints of every kind (samplers yield numpy ints and 0-d tensors), negative ones, slices,
    index arrays, boolean masks, and a clear error for anything else."""
    import numpy as np
    import pandas as pd
    import torch

    from pillsnap.data.datasets import CropRow, CropTable

    frame = pd.DataFrame({"image_path": [f"/p/{i}.png" for i in range(5)],
                          "label_path": [f"/l/{i}.json" for i in range(5)],
                          "mapping_code": ["K-000001", None, "K-000003", "K-000004", "K-000005"],
                          "bbox_x": [1, 2, 3, 4, 5], "bbox_y": 0.5, "bbox_w": 10, "bbox_h": 12}, index=[7, 3, 9, 1, 0])
    table = CropTable.from_frame(frame)
    assert table[1] == CropRow("/p/1.png", "/l/1.json", None, 2.0, 0.5, 10.0, 12.0)  # positional, like the list
    assert table[-1].image_path == table[np.int64(4)].image_path == table[torch.tensor(4)].image_path == "/p/4.png"
    paths = lambda t: [r.image_path for r in t]  # noqa: E731
    assert paths(table[1:4:2]) == ["/p/1.png", "/p/3.png"] and paths(table[[4, -5]]) == ["/p/4.png", "/p/0.png"]
    assert paths(table[np.array([True, False, True, False, False])]) == ["/p/0.png", "/p/2.png"]
    assert table.column("mapping_code")[:2] == ["K-000001", None] and len(table) == 5 == len(list(table))
    for bad, error in ((5, IndexError), (-6, IndexError), (np.array([5]), IndexError), (np.array([True]), IndexError),
                       (np.array([0.5]), TypeError), ("a", TypeError)):
        with pytest.raises(error):
            table[bad]
    empty = CropTable.from_frame(frame.iloc[:0])
    assert len(empty) == 0 and list(empty) == [] and len(empty[[]]) == 0


def frozen_in_worker(collate):
    """`collate` run in the loader's worker, with how many objects that worker had frozen at the time."""
    import gc

    def wrapped(batch):
        return collate(batch), gc.get_freeze_count()

    return wrapped


@pytest.mark.parametrize("kind", ["classification", "detection"])
def test_loader_workers_freeze_what_they_inherit(synth_cfg, kind):
    """A worker's garbage collector must not walk the trainer's objects (each page it writes to is copied into the
    worker): the classification and detection loaders' workers freeze them when they start."""
    cfg = OmegaConf.merge(synth_cfg, {"dataloader": {"num_workers": 1, "persistent_workers": False}})
    loaders = build_dataloaders_twostage(cfg)
    loader = loaders.cls_val if kind == "classification" else loaders.det_val
    assert loader.num_workers == 1
    loader.collate_fn = frozen_in_worker(loader.collate_fn)
    batch, frozen = next(iter(loader))
    assert batch is not None and frozen > 1000  # the inherited heap (torch, pandas, ...), not a handful of objects


def _pill_crop(side: int = 80, margin: float = 0.15) -> Image.Image:
    """A square training crop as crop_box cuts it: a red pill filling 1 / (1 + 2 margin) of it on a grey backdrop
    whose left half is lighter than its right, so a mirrored border can be told from padding."""
    from PIL import ImageDraw

    image = Image.new("RGB", (side, side), (150, 150, 150))
    ImageDraw.Draw(image).rectangle((0, 0, side // 2, side), fill=(200, 200, 200))
    pill = side / (1 + 2 * margin)
    lo = (side - pill) / 2
    ImageDraw.Draw(image).ellipse((lo, lo, lo + pill, lo + pill), fill=(220, 30, 30))
    return image


def _red_centre(image: Image.Image) -> tuple[float, float, float]:
    """The red pill's centre (x, y) and its width, in pixels."""
    red = np.asarray(image)[..., 0].astype(int) - np.asarray(image)[..., 1] > 100
    ys, xs = np.nonzero(red)
    return xs.mean(), ys.mean(), xs.max() - xs.min() + 1


def test_box_jitter_moves_and_resizes_the_crop_within_its_bounds_and_mirrors_the_backdrop():
    """A jittered training crop is a square grown or shrunk by at most 1 + scale and moved by at most shift x the
    pill's size; where it reaches past the crop, the backdrop is mirrored, never black; no jitter is the crop."""
    from pillsnap.data.datasets import BoxJitter

    crop, margin = _pill_crop(), 0.15
    pill = 80 / (1 + 2 * margin)
    assert BoxJitter(0.0, 0.0, margin)(crop) is crop
    torch.manual_seed(0)
    jitter = BoxJitter(0.2, 0.1, margin)
    sides, offsets = [], []
    for _ in range(200):
        out = jitter(crop)
        assert out.width == out.height
        sides.append(out.width / 80)
        x, y, width = _red_centre(out)
        assert width <= pill + 2  # cut, not resized: the pill keeps its pixels
        if width >= pill - 1:  # the whole pill inside: its centre is where the box moved it
            offsets.append(((out.width / 2 - x) / pill, (out.height / 2 - y) / pill))
        assert (np.asarray(out).sum(-1) > 0).all()  # nothing black: the border is mirrored
    sides, offsets = np.array(sides), np.abs(np.array(offsets))
    assert sides.min() >= 1 / 1.2 - 0.02 and sides.max() <= 1.2 + 0.02 and sides.std() > 0.05
    assert len(offsets) > 100 and offsets.max() <= 0.1 + 0.03 and offsets.max() > 0.05
    torch.manual_seed(0)
    assert [jitter(crop).size for _ in range(5)] == [(round(s * 80),) * 2 for s in sides[:5]]  # torch's RNG


def test_training_crops_are_jittered_as_configured_and_evaluation_crops_never(manifest_dir):
    """data.crop_jitter reaches the training data set's transform; validation, test and the evaluation views of the
    training set keep the labelled box's crop."""
    from pillsnap.config import load_config
    from pillsnap.data.datasets import BoxJitter
    from pillsnap.data.loaders import _classification_datasets

    rows = load_manifest(manifest_dir)
    rows = rows[rows.image_type == "single"].copy()
    cfg = load_config(None, ["data.crop_jitter.scale=0.3", "data.crop_jitter.shift=0.05", "model.image_size=32"],
                      dotenv_path=None)
    datasets = _classification_datasets(rows, sorted(rows.mapping_code.unique()), cfg)

    def jitters(dataset):
        return [step for step in dataset.transform.transforms if isinstance(step, BoxJitter)]

    assert jitters(datasets["train"]) == [BoxJitter(0.3, 0.05, float(cfg.data.crop_margin))]
    assert not jitters(datasets["val"]) and not jitters(datasets["test"])
    assert not jitters(datasets["train"].evaluation_view())


def test_loaders_fit_their_batches_in_flight_to_the_shared_memory(synth_cfg, monkeypatch, caplog):
    """Loader workers hand their batches over in /dev/shm: a container's default 64 MB holds one 32 x 384 px float32
    batch (57 MB), and 8 workers at prefetch 4 died of a bus error after the run's whole start-up. The prefetch is
    lowered first, then the workers, and the log says how to give the container more."""
    from omegaconf import OmegaConf

    from pillsnap.data import loaders

    cfg = OmegaConf.create({"train": {"batch_size": 32, "detection": {"batch_size": 16}, "strategy": "interleaved"},
                            "model": {"image_size": 384, "det_image_size": 640},
                            "dataloader": {"prefetch_factor": 4}})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    mb = 2**20
    for shm, expected in ((16 * 1024 * mb, (8, 4)), (1024 * mb, (5, 1)), (64 * mb, (0, 1)), (None, (8, 4))):
        monkeypatch.setattr(loaders, "_shared_memory_size", lambda shm=shm: shm)
        assert loaders._fit_shared_memory(cfg, 8, 2) == expected, shm
    assert "--shm-size" in caplog.text and "/dev/shm holds 64 MB" in caplog.text
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on the machine share it
    monkeypatch.setattr(loaders, "_shared_memory_size", lambda: 8 * 1024 * mb)
    assert loaders._fit_shared_memory(cfg, 8, 2) == (8, 1)  # alone on the machine: (8, 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")

    # the loaders are built with what fits; the configuration is left as it was
    monkeypatch.setattr(loaders, "_shared_memory_size", lambda: 1)
    small = OmegaConf.merge(synth_cfg, {"dataloader": {"num_workers": 2, "prefetch_factor": 3}})
    cls_train, cls_val = loaders.build_dataloaders_twostage(small)[:2]
    assert cls_train.num_workers == cls_val.num_workers == 0 and small.dataloader.prefetch_factor == 3
