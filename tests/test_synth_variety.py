"""The generator's photo variety (backdrops, dishes, light, blur, noise, JPEG) and the detector's own augmentation:
the variety appears at its shares and stays deterministic, boxes stay exact, dishes are never labelled, and the
configured augmentation reaches ultralytics' dataset, mosaic closing for the last epochs."""

from __future__ import annotations

import colorsys
import io
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pillsnap.data.synth import make_classes
from pillsnap.data.synth_render import PhotoConditions, render_photo, style_of
from pillsnap.data.synth_style import HARD_SHARES, PLAIN_SHARES, Dish, finish, photo_style

COND = PhotoConditions("0", "2", "2", 90, 0)


@pytest.fixture(scope="module")
def looks():
    classes = make_classes(12, seed=4)
    return [c.look for c in classes[:4]]


def _styles(n_pills: int, n: int = 600) -> list:
    return [photo_style("2", "2", n_pills, seed, seed) for seed in range(n)]


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_backdrops_vary_in_hue_and_brightness_and_most_stay_real():
    styles = _styles(4)
    kinds = Counter(s.backdrop_kind for s in styles)
    assert set(kinds) == {"real", "hue", "grey", "light"}
    assert kinds["real"] / len(styles) > 0.5  # the bulk still looks like the real set
    levels = [float(np.mean(s.backdrop)) for s in styles]
    assert min(levels) < 85 and max(levels) > 170  # dark greys to light ones
    hues = [colorsys.rgb_to_hsv(*(c / 255 for c in s.backdrop))[0] for s in styles if s.backdrop_kind == "hue"]
    assert np.ptp(hues) > 0.08  # hue turned around the blue-grey
    real = [s.backdrop for s in styles if s.backdrop_kind == "real"]
    assert np.abs(np.median(real, axis=0) - np.array([90, 100, 140])).max() < 10


def test_dishes_blur_noise_and_jpeg_appear_at_their_shares():
    combos, singles = _styles(4), _styles(1)
    assert 0.25 < np.mean([s.dish is not None for s in combos]) < 0.45
    # single mode locates its pill on an evenly lit plain backdrop: no dish, no strong falloff there
    assert not any(s.dish for s in singles) and max(s.falloff for s in singles) < 0.07
    blurs = Counter(s.blur for s in combos)
    assert set(blurs) == {"", "lens", "defocus", "motion"}
    qualities = [s.jpeg_quality for s in combos if s.jpeg_quality]
    assert 0.35 < len(qualities) / len(combos) < 0.65 and min(qualities) >= 55 and max(qualities) <= 95
    noises = [s.noise for s in combos]
    assert min(noises) < 1.5 and max(noises) > 5
    assert max(s.falloff for s in combos) > 0.25 and any(max(s.cast) / min(s.cast) > 1.12 for s in combos)


def test_style_shares_move_the_mix():
    hard = [photo_style("2", "2", 4, seed, seed, HARD_SHARES) for seed in range(300)]
    plain = [photo_style("2", "2", 4, seed, seed, PLAIN_SHARES) for seed in range(300)]
    assert all(s.backdrop_kind == "real" and s.dish is None and not s.jpeg_quality for s in plain)
    assert np.mean([s.backdrop_kind != "real" for s in hard]) > 0.6
    assert np.mean([s.dish is not None for s in hard]) > 0.45


def test_same_seed_same_photo_other_seed_differs(looks):
    a = render_photo(looks, COND, 0.15, seed=11, layout_seed=3)
    b = render_photo(looks, COND, 0.15, seed=11, layout_seed=3)
    c = render_photo(looks, COND, 0.15, seed=12, layout_seed=3)
    assert a == b and a[0] != c[0]
    assert style_of(looks, COND, 11, 3) == style_of(looks, COND, 11, 3)


def test_the_shots_of_a_combination_share_their_scene():
    shots = [photo_style("2", "2", 4, seed, scene_seed=77) for seed in range(20)]
    assert len({(s.backdrop, s.dish) for s in shots}) == 1  # same backdrop and dish at every elevation
    assert len({(s.noise, s.jpeg_quality, s.blur_px) for s in shots}) > 10  # each shot its own light and lens


def _clean(style):
    """The style without the per-photo randomness that would hide a pixel comparison."""
    return replace(style, cast=(1.0, 1.0, 1.0), falloff=0.0, blur="", blur_px=0.0, noise=0.0, jpeg_quality=0)


def test_pills_lie_inside_their_boxes_and_the_dish_is_never_labelled(looks):
    """Rendered with and without its pills (same backdrop and dish), every pixel a pill brightened lies inside a
    labelled box; the dish (bright, at the left edge) is in the photo but in no box, and there is one box a pill."""
    dish = Dish("dish", (-0.35, 0.25, 0.12, 0.75), (240, 240, 242), 0.1)
    style = replace(_clean(style_of(looks, COND, 5)), backdrop_kind="real", backdrop=(90.0, 100.0, 140.0), dish=dish)
    png, boxes, (w, h) = render_photo(looks, COND, 0.25, seed=5, style=style)
    empty, _, _ = render_photo([], COND, 0.25, seed=5, style=style)
    photo, plain = _decode(png), _decode(empty)
    assert len(boxes) == len(looks)
    inside = np.zeros((h, w), dtype=bool)
    for x, y, bw, bh in boxes:
        inside[max(0, y - 1):y + bh + 1, max(0, x - 1):x + bw + 1] = True
    brightened = (photo - plain).max(axis=2) > 30
    assert brightened.sum() > 500 and not (brightened & ~inside).any()
    rim = plain[h // 2, 2]  # the dish at the left edge, half-way down
    assert rim.min() > 200 and not inside[h // 2, 2]


def test_finish_applies_noise_blur_and_jpeg_as_recorded(looks):
    flat = Image.new("RGB", (200, 200), (100, 110, 140))
    base = replace(_clean(style_of(looks, COND, 1)), cast=(1.0, 1.0, 1.0))
    noisy = _decode(finish(flat, replace(base, noise=6.0), 1.0, noise_seed=1))
    assert abs(noisy[..., 1].std() - 6.0) < 1.0
    edge = Image.new("RGB", (200, 200), (60, 60, 60))
    edge.paste((220, 220, 220), (100, 0, 200, 200))
    sharp = _decode(finish(edge, base, 1.0, noise_seed=1))
    blurred = _decode(finish(edge, replace(base, blur="defocus", blur_px=6.0), 1.0, noise_seed=1))
    moved = _decode(finish(edge, replace(base, blur="motion", blur_px=8.0, motion_angle=0.0), 1.0, noise_seed=1))
    step = lambda a: np.abs(np.diff(a[100, :, 0])).max()  # noqa: E731 - the sharpest step across the edge
    assert step(blurred) < step(sharp) / 2 and step(moved) < step(sharp) / 2
    textured = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    raw = _decode(finish(textured, base, 1.0, noise_seed=1))
    jpeg = _decode(finish(textured, replace(base, jpeg_quality=60), 1.0, noise_seed=1))
    assert np.abs(raw - jpeg).mean() > 5  # JPEG artefacts kept in the PNG


# ---- ultralytics' augmentation through our config ----------------------------------------------------------------

def _transforms(loader) -> list:
    out, stack = [], [loader.dataset.transforms]
    while stack:
        t = stack.pop()
        inner = getattr(t, "transforms", None)
        if isinstance(inner, list):
            stack.extend(inner)
        else:
            out.append(t)
    return out


def _train_loader(manifest_dir, tmp_path, augment):
    from pillsnap.data.scan import load_manifest
    from pillsnap.data.yolo import build_detection_loader, export_yolo

    rows = load_manifest(manifest_dir)
    rows = rows[rows.image_type == "combination"].assign(split="train")
    data_yaml = export_yolo(rows, tmp_path / "yolo")
    return build_detection_loader(data_yaml, "train", 64, 2, 0, train=True, augment=augment)


def test_configured_augmentation_reaches_ultralytics_dataset(manifest_dir, tmp_path):
    from pillsnap.config import load_config
    from pillsnap.data.loaders import detection_augment

    cfg = load_config("config.yaml", ["train.detection.augment.hsv_h=0.11", "train.detection.augment.flipud=0.7",
                                      "train.detection.augment.mosaic=0.6"], dotenv_path=None)
    augment = detection_augment(cfg)
    assert augment["close_mosaic"] == int(cfg.train.detection.augment.close_mosaic)
    parts = _transforms(_train_loader(manifest_dir, tmp_path, augment))
    by_name = {type(t).__name__ + getattr(t, "direction", ""): t for t in parts}
    assert by_name["RandomHSV"].hgain == pytest.approx(0.11)
    assert by_name["RandomFlipvertical"].p == pytest.approx(0.7)
    assert by_name["Mosaic"].p == pytest.approx(0.6)
    batch = next(iter(_train_loader(manifest_dir, tmp_path / "again", augment)))
    assert batch["img"].shape[-1] == 64 and len(batch["bboxes"]) > 0


def test_mosaic_closes_for_the_last_epochs_and_after_resume(manifest_dir, tmp_path):
    from pillsnap.config import load_config
    from pillsnap.engine.detection import DetectionTask

    cfg = load_config("config.yaml", ["model.detector=yolo11n", "model.det_image_size=64", "train.epochs=3",
                                      "model.pretrained=false", "train.detection.augment.close_mosaic=1"],
                      dotenv_path=None)
    loader = _train_loader(manifest_dir, tmp_path, {"mosaic": 1.0})
    mosaic = next(t for t in _transforms(loader) if type(t).__name__ == "Mosaic")
    task = DetectionTask(cfg, loader, None, "cpu")
    task.epoch_trained(1)  # on every rank, after each epoch the detector trained
    assert getattr(loader.dataset, "mosaic", True) is not False and mosaic.p == 1.0
    task.epoch_trained(2)  # one epoch left: close_mosaic=1
    assert loader.dataset.mosaic is False
    assert all(type(t).__name__ != "Mosaic" or t.p == 0.0 for t in _transforms(loader))
    state = task.checkpoint_state(2, None)
    resumed_loader = _train_loader(manifest_dir, tmp_path / "resumed", {"mosaic": 1.0})
    resumed = DetectionTask(cfg, resumed_loader, None, "cpu")
    assert getattr(resumed_loader.dataset, "mosaic", True) is not False
    resumed.load_checkpoint_state(state)
    assert resumed.epochs_trained == 2 and resumed_loader.dataset.mosaic is False


def test_each_written_photo_has_the_recorded_style(synth_root):
    """dataset_styles says what every photo of a generated set got: one style per written photo, and the recorded
    backdrop is the one in the photo (border medians follow it, across the backdrop kinds)."""
    from conftest import SYNTH_CLASSES, SYNTH_COMBOS, SYNTH_PER_CLASS

    from pillsnap.data.synth import dataset_styles

    styles = dataset_styles(SYNTH_CLASSES, SYNTH_PER_CLASS, SYNTH_COMBOS, seed=0)
    photos = {p.stem: p for p in synth_root.rglob("K-*_200.png")}
    assert set(styles) == set(photos)
    recorded, measured = [], []
    for stem, style in styles.items():
        image = _decode(photos[stem].read_bytes())
        border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3)])
        recorded.append(np.mean(np.array(style.backdrop) * np.array(style.cast)))
        measured.append(np.median(border.mean(axis=1)))
    assert np.corrcoef(recorded, measured)[0, 1] > 0.8


# ---- bench/detector_transfer.py: the held-out sets and the scoring ---------------------------------------------

def _transfer_bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "detector_transfer.py"
    spec = importlib.util.spec_from_file_location("detector_transfer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_transfer_bench_matches_boxes_one_to_one():
    bench = _transfer_bench()
    truth = np.array([[0, 0, 10, 10], [20, 20, 10, 10]], dtype=float)
    pred = np.array([[0, 0, 10, 10, 0.9], [1, 1, 10, 10, 0.8], [20, 22, 10, 10, 0.7], [50, 50, 5, 5, 0.6]])
    assert bench.iou(truth, truth[:1])[:, 0].tolist() == pytest.approx([1.0, 0.0])
    assert bench.match(pred, truth) == 2  # the duplicate of the first pill and the box on nothing do not count
    assert bench.match(pred, truth[:0]) == 0


def test_transfer_bench_scores_a_detector_on_plain_and_hard_sets():
    bench = _transfer_bench()
    plain = bench.render_set(PLAIN_SHARES, 4, 0.1, 0)
    hard = bench.render_set(HARD_SHARES, 12, 0.1, 1)
    assert all(p.style.backdrop_kind == "real" and p.style.dish is None for p in plain)
    assert any(p.style.dish for p in hard) and any(p.style.backdrop_kind != "real" for p in hard)
    assert all(3 <= len(p.boxes) <= 4 for p in plain + hard)
    truth = {id(p.image): p for p in hard}

    def oracle(image, conf):  # every pill found, plus one box on the dish where there is one
        photo = truth[id(image)]
        boxes = [[*b, 0.9] for b in photo.boxes] + ([[0, 0, 5, 5, 0.5]] if photo.style.dish else [])
        return np.array(boxes, dtype=float)

    result = bench.score(oracle, hard, 0.3)
    dishes = sum(1 for p in hard if p.style.dish)
    assert result["recall@0.5"] == 1.0 and result["pills"] == sum(len(p.boxes) for p in hard)
    assert result["precision"] == pytest.approx(result["pills"] / (result["pills"] + dishes), abs=1e-3)
    assert result["false_boxes_per_photo"]["dish"] == 1.0 and result["recall_by"]["dish=yes"] == 1.0


def test_transfer_bench_names_a_folder_without_checkpoints(tmp_path, monkeypatch, capsys):
    bench = _transfer_bench()
    monkeypatch.setattr("sys.argv", ["detector_transfer.py", "--exp", str(tmp_path)])
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2 and "no checkpoints folder" in capsys.readouterr().err
