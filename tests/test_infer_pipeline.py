"""Predictor / predict_pipeline / `pillsnap predict` on a fake experiment dir (untrained tiny models)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import StandInEvidence
from PIL import Image, ImageDraw

from pillsnap.cli import main as cli_main
from pillsnap.config import config_to_dict, load_config
from pillsnap.infer.pipeline import Predictor, predict_pipeline
from pillsnap.infer.preprocess import crop_pill, letterbox, locate_pill, unletterbox_boxes
from pillsnap.models.classifier import build_classification_model
from pillsnap.models.detector import build_yolo_model
from pillsnap.utils import save_ckpt, save_json

CODES = ["K-000001", "K-000002", "K-000003"]


def _cfg(exp_dir: Path, *overrides: str):
    return load_config("config.yaml", [f"paths.exp_dir={exp_dir}", "model.backbone=test_efficientnet",
                                       "model.num_classes=3", "model.image_size=32", "model.detector=yolo11n",
                                       "model.det_image_size=64", *overrides], dotenv_path=None)


def _ckpt(model: torch.nn.Module, cfg) -> dict:
    return {"model_state": model.state_dict(), "optimizer_state": {}, "scheduler_state": {}, "scaler_state": {},
            "epoch": 1, "best_metric": 0.0, "config_snapshot": config_to_dict(cfg)}


def features_of(exp_dir: Path) -> Path:
    """The class Gaussians' file the run's calibration names (unknown_features-<hash>.npz)."""
    import json

    ckpts = Path(exp_dir) / "checkpoints"
    return ckpts / json.loads((ckpts / "calibration.json").read_text(encoding="utf-8"))["features_file"]


def make_exp_dir(root: Path, with_detector: bool = True) -> Path:
    cfg = _cfg(root)
    ckpts = root / "checkpoints"
    torch.manual_seed(0)
    save_ckpt(ckpts / "classification_best.pt", _ckpt(build_classification_model("test_efficientnet", 3), cfg))
    if with_detector:
        save_ckpt(ckpts / "detection_best.pt", _ckpt(build_yolo_model("yolo11n", 1), cfg))
    save_json(ckpts / "classes.json", {"class_names": CODES,
                                       "class_map": {c: {"name": f"drug {i}"} for i, c in enumerate(CODES)}})
    return root


def pill_photo(path: Path, boxes: list[tuple[int, int, int, int]]) -> Path:
    image = Image.new("RGB", (120, 160), (190, 190, 185))
    draw = ImageDraw.Draw(image)
    for x, y, w, h in boxes:
        draw.ellipse((x, y, x + w, y + h), fill=(200, 40, 120))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory) -> Path:
    return make_exp_dir(tmp_path_factory.mktemp("exp"))


@pytest.fixture()
def predictor(exp_dir: Path) -> Predictor:
    return Predictor(exp_dir, _cfg(exp_dir), device="cpu")


def test_single_mode_answers_one_pill_with_topk(predictor: Predictor, tmp_path: Path) -> None:
    photo = pill_photo(tmp_path / "one.png", [(45, 60, 30, 24)])
    result = predictor.predict(photo, mode="single")
    assert result["mode_used"] == "single" and result["fallback_reason"] is None
    assert result["num_pills"] == 1 and len(result["pills"]) == 1
    pill = result["pills"][0]
    assert pill["mapping_code"] in CODES and pill["name"].startswith("drug")
    probs = [c["probability"] for c in pill["topk"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
    assert result["single_confidence"] == pytest.approx(probs[0])
    # single mode crops the located pill, so its box sits around the drawn ellipse
    x, y, w, h = pill["bbox"]
    assert 30 <= x <= 50 and 45 <= y <= 65 and w < 60
    assert predictor._detector is None  # lazy: single mode never loads the detector


def _records(predictor: Predictor) -> int:
    log = predictor.hard_cases.path_for_today()
    return len(log.read_text(encoding="utf-8").splitlines()) if log.exists() else 0


def test_auto_multi_object_hint_routes_to_combo_without_a_hard_case(predictor: Predictor, tmp_path: Path,
                                                                     monkeypatch) -> None:
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    boxes = np.array([[70, 100, 30, 24, 0.9], [10, 10, 30, 24, 0.8]], dtype=float)
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: boxes)
    predictor.settings.single_confidence_threshold = 0.0  # whatever the classifier says, it is "confident"
    before = _records(predictor)
    result = predictor.predict(photo, mode="auto")
    assert (result["mode_used"], result["fallback_reason"]) == ("combo", "multi_object_hint")
    assert [p["bbox"] for p in result["pills"]] == [[70, 100, 30, 24], [10, 10, 30, 24]]
    assert [p["det_confidence"] for p in result["pills"]] == [0.9, 0.8]
    # Routine routing, and no pill that may be wrong (no unknown rule here, no imprint read): not a hard case.
    assert not any(p["unknown"] or p["imprint_unresolved"] for p in result["pills"])
    assert result["hard_case"] == [] and _records(predictor) == before


def test_auto_consults_the_real_detector_on_every_photo(predictor: Predictor, tmp_path: Path) -> None:
    photo = pill_photo(tmp_path / "low.png", [(45, 60, 30, 24)])
    predictor.settings.single_confidence_threshold = 0.0  # even a "confident" whole-photo answer is checked
    result = predictor.predict(photo, mode="auto", conf_threshold=0.0001)
    assert predictor._detector is not None and result["num_detections"] > 1  # an untrained detector sees many
    assert (result["mode_used"], result["fallback_reason"]) == ("combo", "multi_object_hint")
    assert result["num_pills"] == result["num_detections"]


def test_a_photo_of_many_boxes_answers_the_most_confident_max_pills_and_says_so(exp_dir: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    """An untrained detector at a tiny threshold boxes everything: only inference.max_pills boxes, the most
    confident, are answered, and the answer says there may be more (a flag and a hard case); the crops go through
    the classifier in chunks, with the answers of one batch."""
    from pillsnap.infer import pipeline

    photo = pill_photo(tmp_path / "heap.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    every = Predictor(exp_dir, _cfg(exp_dir), device="cpu").detect(Image.open(photo).convert("RGB"), 0.0001)
    assert len(every) > 3
    capped = Predictor(exp_dir, _cfg(exp_dir, "inference.max_pills=3"), device="cpu")
    result = capped.predict(photo, mode="combo", conf_threshold=0.0001)
    assert result["num_detections"] == result["num_pills"] == 3
    assert sorted(p["det_confidence"] for p in result["pills"]) == pytest.approx(sorted(every[:, 4])[-3:], abs=1e-6)
    assert "pill_limit_reached" in result["flags"] and "pill_limit_reached" in result["hard_case"]
    # measuring the detector (mAP, the box check's calibration) keeps every box NMS keeps: the cap is answering's
    assert len(capped.detect(Image.open(photo).convert("RGB"), 0.0001)) == len(every)
    crops = [Image.open(photo).convert("RGB").crop((i, i, i + 30, i + 30)) for i in range(5)]
    whole_logits, whole_features = capped.forward(crops)
    monkeypatch.setattr(pipeline, "FORWARD_CHUNK", 2)  # 2 + 2 + 1
    logits, features = capped.forward(crops)
    assert torch.allclose(logits, whole_logits, atol=1e-5) and torch.allclose(features, whole_features, atol=1e-5)


def test_one_detected_pill_must_agree_with_the_whole_photo_answer(predictor: Predictor, tmp_path: Path,
                                                                  monkeypatch) -> None:
    photo = pill_photo(tmp_path / "one.png", [(45, 60, 30, 24)])
    located = predictor.predict(photo, mode="single")["pills"][0]["bbox"]
    same_place = np.array([[*located, 0.9]], dtype=float)
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: same_place)
    predictor.settings.single_confidence_threshold = 0.0
    result = predictor.predict(photo, mode="auto")
    assert (result["mode_used"], result["num_detections"], result["flags"]) == ("single", 1, [])
    predictor.settings.single_confidence_threshold = 1.01  # not confident, but the detector confirmed the pill
    assert predictor.predict(photo, mode="auto")["mode_used"] == "single"
    elsewhere = np.array([[0, 0, 20, 20, 0.9]], dtype=float)  # one box, but not where the whole-photo pill is
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: elsewhere)
    predictor.settings.single_confidence_threshold = 0.0
    result = predictor.predict(photo, mode="auto")
    assert (result["mode_used"], result["fallback_reason"]) == ("combo", "detector_disagrees")
    record = json.loads(predictor.hard_cases.path_for_today().read_text(encoding="utf-8").splitlines()[-1])
    assert record["reasons"][0] == "detector_disagrees" and record["num_detections"] == 1


def test_no_detected_pill_is_flagged(predictor: Predictor, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: np.zeros((0, 5)))
    result = predictor.predict(pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)]), mode="auto")
    assert result["mode_used"] == "single" and result["flags"] == ["no_pill_detected"]
    assert "no_pill_detected" in result["hard_case"]


def test_a_hard_case_that_cannot_be_logged_still_gets_its_answer(predictor: Predictor, tmp_path: Path,
                                                                  monkeypatch, caplog) -> None:
    """A full disk or a read-only experiment folder: the hard-case record is lost, never the answer."""
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: np.zeros((0, 5)))
    shutil.rmtree(predictor.hard_cases.root, ignore_errors=True)
    predictor.hard_cases.root.write_text("a file where the folder should be", encoding="utf-8")
    photo = pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])
    with caplog.at_level(logging.WARNING):
        results = [predictor.predict(photo, mode="auto") for _ in range(3)]
    assert all("no_pill_detected" in r["hard_case"] and r["pills"] for r in results)
    assert len([r for r in caplog.records if "hard case not logged" in r.getMessage()]) == 1


def test_combo_without_detector_is_a_clear_error(tmp_path: Path) -> None:
    root = make_exp_dir(tmp_path, with_detector=False)
    predictor = Predictor(root, _cfg(root), device="cpu")
    photo = pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])
    with pytest.raises(FileNotFoundError, match="combo mode needs one"):
        predictor.predict(photo, mode="combo")
    predictor.settings.single_confidence_threshold = 1.01
    result = predictor.predict(photo, mode="auto")
    assert result["mode_used"] == "single" and result["flags"] == ["detector_unavailable"]  # auto degrades
    assert predictor.predict(photo, mode="single")["flags"] == ["detector_unavailable"]


def test_single_mode_with_a_detector_is_not_flagged_detector_unavailable(predictor: Predictor,
                                                                         tmp_path: Path) -> None:
    predictor.warm_up()  # the server loads every model before its first answer
    result = predictor.predict(pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)]), mode="single")
    assert predictor._detector is not None and result["num_detections"] is None and result["flags"] == []


def test_bad_inputs_are_named(predictor: Predictor, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Image not found"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="mode must be one of"):
        predictor.predict(np.zeros((8, 8, 3), dtype=np.uint8), mode="many")
    with pytest.raises(FileNotFoundError, match="No classifier checkpoint"):
        Predictor(tmp_path / "nothing", _cfg(tmp_path))


def test_predict_pipeline_accepts_arrays(predictor: Predictor) -> None:
    image = np.full((64, 48, 3), 180, dtype=np.uint8)
    result = predict_pipeline(image, mode="single", predictor=predictor)
    assert result["mode_used"] == "single" and result["image"] is None and result["num_pills"] == 1


def test_cli_predict_json(exp_dir: Path, tmp_path: Path, capsys) -> None:
    photos = [pill_photo(tmp_path / f"{i}.png", [(45, 60, 30, 24)]) for i in range(2)]
    code = cli_main(["predict", *map(str, photos), "--exp", str(exp_dir), "--mode", "single", "--json",
                     "--set", "inference.topk=2"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 2
    assert all(r["mode_used"] == "single" and len(r["pills"]) == 1 for r in out)
    assert all(len(r["pills"][0]["topk"]) == 2 for r in out)


def test_cli_predict_missing_image_fails(exp_dir: Path, tmp_path: Path) -> None:
    assert cli_main(["predict", str(tmp_path / "nope.png"), "--exp", str(exp_dir)]) == 1


def test_cli_predict_reads_folders_and_keeps_what_it_answered_when_interrupted(exp_dir: Path, tmp_path: Path,
                                                                               capsys, monkeypatch) -> None:
    """A folder is its photos (subfolders too, in name order; other files left out); every answer is printed as it
    is made, so an interrupt keeps the answers given (still one valid JSON list); an empty folder is an error entry
    naming it; a photo the models fail on (a RuntimeError) costs only its own answer."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    photos = [pill_photo(folder / name, [(45, 60, 30, 24)]) for name in ("b.png", "more/a.JPG")]
    (folder / "notes.txt").write_text("not a photo", encoding="utf-8")
    (folder / "._b.png").write_bytes(b"macOS resource fork")  # a hidden file: not a photo of the folder
    (tmp_path / "empty").mkdir()
    args = ["--exp", str(exp_dir), "--mode", "single", "--json"]
    assert cli_main(["predict", str(folder), str(tmp_path / "empty"), *args]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == [str(photos[0]), str(photos[1]), str(tmp_path / "empty")]
    assert all(len(r["pills"]) == 1 for r in out[:2]) and "no photos" in out[2]["error"]
    calls = []

    def flaky(self, image, **kwargs):
        calls.append(kwargs["name"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        raise KeyboardInterrupt

    monkeypatch.setattr(Predictor, "predict", flaky)
    assert cli_main(["predict", str(folder), str(photos[0]), *args]) == 130
    out = json.loads(capsys.readouterr().out)  # what was answered before the interrupt, as valid JSON
    assert len(out) == 1 and out[0]["error_type"] == "OutOfMemoryError" and len(calls) == 2
    calls.clear()
    assert cli_main(["predict", str(folder), *args[:-1]]) == 130  # the text output ends there too
    assert capsys.readouterr().out.startswith(f"{photos[0]}: ERROR CUDA out of memory")

    def faulty(self, image, **kwargs):  # any other failure of the models is a fault: the run stops on it
        calls.append(kwargs["name"])
        if len(calls) > 1:
            raise RuntimeError("shape mismatch")
        return {"image": kwargs["name"], "mode_used": "single", "pills": []}

    calls.clear()
    monkeypatch.setattr(Predictor, "predict", faulty)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli_main(["predict", str(folder), *args])
    assert [r["image"] for r in json.loads(capsys.readouterr().out)] == [str(photos[0])]  # still valid JSON


def test_a_folder_of_photos_follows_symlinked_subfolders_once(tmp_path: Path) -> None:
    """A linked subfolder (photos kept elsewhere, e.g. on another disk) counts; a link back up the tree or a second
    link to one folder does not answer its photos twice or loop; hidden folders (.thumbnails) are left out."""
    from pillsnap.infer.cli import photo_paths

    folder, elsewhere = tmp_path / "photos", tmp_path / "disk2" / "day2"
    for where in (folder, elsewhere, folder / ".thumbnails"):
        where.mkdir(parents=True)
    for photo in (folder / "a.png", elsewhere / "b.jpg", folder / ".thumbnails" / "a.png"):
        photo.write_bytes(b"x")
    (folder / "day2").symlink_to(elsewhere)
    (folder / "again").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to(folder)
    assert photo_paths([str(folder)]) == [str(folder / "a.png"), str(folder / "again" / "b.jpg")]


def test_letterbox_roundtrip_and_locate() -> None:
    image = Image.new("RGB", (100, 200), (150, 150, 150))
    tensor, scale, pad = letterbox(image, 64)
    assert tensor.shape == (1, 3, 64, 64) and scale == pytest.approx(0.32)
    box = np.array([[pad[0] + 3.2, pad[1] + 6.4, pad[0] + 16.0, pad[1] + 32.0]])
    assert np.allclose(unletterbox_boxes(box, scale, pad, image.size), [[10, 20, 40, 80]], atol=1e-6)
    assert locate_pill(image) is None  # a plain backdrop has no pill


def _calibration(ckpts: Path, **thresholds: float | None) -> dict:
    from pillsnap.utils.io import file_sha256

    return {"temperature": 1.0, "unknown_thresholds": {"probability": None, "feature_distance": None, **thresholds},
            "classifier_sha256": file_sha256(ckpts / "classification_best.pt")}


def pill_photo_of(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (120, 160), (190, 190, 185))
    x, y = int(rng.integers(30, 50)), int(rng.integers(50, 80))
    ImageDraw.Draw(image).ellipse((x, y, x + 34, y + 26), fill=tuple(int(c + rng.integers(-12, 12)) for c in colour))
    image.save(path)
    return path


def test_calibration_scales_probabilities_and_answers_unknown_below_the_threshold(tmp_path: Path) -> None:
    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    ckpts = root / "checkpoints"
    calibration = {**_calibration(ckpts, probability=0.5), "temperature": 1000.0}
    save_json(ckpts / "calibration.json", calibration)
    predictor = Predictor(root, _cfg(root, "inference.unknown_rule=probability"), device="cpu")
    photo = pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])
    result = predictor.predict(photo, mode="single")
    pill = result["pills"][0]
    assert result["calibrated"] is True
    assert all(c["probability"] == pytest.approx(1 / 3, abs=0.01) for c in pill["topk"])  # T=1000 flattens
    assert pill["unknown"] is True and pill["mapping_code"] is None and "below 0.50" in pill["unknown_reason"]
    assert pill["topk"][0]["mapping_code"] in CODES  # the nearest known drugs are still given
    # a calibration written before there were two rules: its temperature and probability threshold still count
    save_json(ckpts / "calibration.json", {"temperature": 1000.0, "unknown_threshold": 0.5,
                                           "classifier_sha256": calibration["classifier_sha256"]})
    old = Predictor(root, _cfg(root, "inference.unknown_rule=probability"), device="cpu").predict(photo, mode="single")
    assert old["calibrated"] is True and old["pills"][0]["unknown"] is True
    save_json(ckpts / "calibration.json", {**calibration, "classifier_sha256": "stale"})
    stale_predictor = Predictor(root, _cfg(root, "inference.unknown_rule=probability"), device="cpu")
    stale = stale_predictor.predict(photo, mode="single")
    assert stale["calibrated"] is False and stale["pills"][0]["unknown"] is False


def test_a_pill_unlike_every_known_one_is_answered_unknown_by_feature_distance(tmp_path: Path) -> None:
    """Class Gaussians fit on the features of green pills: another green pill is answered, a magenta one (a
    drug the model never saw) is unknown, with the nearest known drugs still listed."""
    from pillsnap.metrics.novelty import ClassGaussians
    from pillsnap.utils.io import file_sha256

    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    ckpts = root / "checkpoints"
    save_json(ckpts / "calibration.json", _calibration(ckpts))
    predictor = Predictor(root, _cfg(root, "inference.imprint.enabled=false"), device="cpu")
    greens = [pill_photo_of(tmp_path / f"g{i}.png", (40, 160, 60), i) for i in range(24)]
    with torch.no_grad():
        crops = [crop_pill(im, locate_pill(im), predictor.crop_margin) for im in map(Image.open, greens[:20])]
        x = torch.stack([predictor.transform(c.convert("RGB")) for c in crops])
        features = predictor.classifier(x)[1].numpy()
    gaussians = ClassGaussians.fit(features, np.arange(20) % 3)
    features_sha256 = file_sha256(gaussians.save(ckpts / "unknown_features.npz"))
    threshold = float(gaussians.score(features).max()) * 1.5
    save_json(ckpts / "calibration.json", {**_calibration(ckpts, feature_distance=threshold),
                                           "features_sha256": features_sha256})
    predictor = Predictor(root, _cfg(root, "inference.imprint.enabled=false"), device="cpu")
    assert predictor.unknown.rule == "feature_distance" and predictor.unknown.active
    known = [predictor.predict(p, mode="single")["pills"][0] for p in greens[20:]]
    assert all(not pill["unknown"] and pill["unknown_score"] <= threshold for pill in known)
    stranger = predictor.predict(pill_photo_of(tmp_path / "m.png", (200, 40, 120), 99), mode="single")["pills"][0]
    assert stranger["unknown"] is True and stranger["mapping_code"] is None and stranger["unknown_score"] > threshold
    assert "farther from every one of the 3 known drugs" in stranger["unknown_reason"]
    assert [c["mapping_code"] in CODES for c in stranger["topk"]] == [True] * 3
    ClassGaussians.fit(features[:10], np.arange(10) % 2).save(ckpts / "unknown_features.npz")  # not the one fit
    assert Predictor(root, _cfg(root), device="cpu").unknown.active is False
    from pillsnap.infer.imprint import ImprintRead

    class ReadButMatchedNothing(StandInEvidence):  # the evidence step read an imprint no candidate has
        def read(self, crop, topk):
            return ImprintRead("HC078", 0.9, 0.0, 0.01, True)

    predictor.evidence = ReadButMatchedNothing()
    # look-alikes that differ by imprint (and the read matches none of them): unresolved, unless the pill is unknown
    predictor.class_map = {c: {"name": c, "print_front": f"X{i}"} for i, c in enumerate(CODES)}
    stranger = predictor.predict(tmp_path / "m.png", mode="single")["pills"][0]
    assert stranger["unknown"] is True and stranger["imprint_unresolved"] is False  # unknown says it, not look-alikes
    assert predictor.predict(greens[20], mode="single")["pills"][0]["imprint_unresolved"] is True
    (ckpts / "unknown_features.npz").unlink()  # the rule cannot run without its file: off, and said so
    assert Predictor(root, _cfg(root), device="cpu").unknown.active is False


def test_hints_rerank_the_candidates_and_a_contradicted_answer_says_so(tmp_path: Path) -> None:
    from pillsnap.infer.matching import Hints

    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    looks = {"K-000001": (["빨강"], "장방형"), "K-000002": (["하양"], "원형"), "K-000003": (["노랑"], "타원형")}
    save_json(root / "checkpoints" / "classes.json", {"class_names": CODES, "class_map": {
        c: {"name": f"drug {i}", "colors": looks[c][0], "shape": looks[c][1]} for i, c in enumerate(CODES)}})
    predictor = Predictor(root, _cfg(root, "inference.imprint.enabled=false"), device="cpu")
    photo = pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])
    plain = predictor.predict(photo, mode="single")["pills"][0]
    assert plain["ranking_changed"] is False and plain["imprint_read"] is None and plain["hints_conflict"] is False

    result = predictor.predict(photo, mode="single", hints=Hints.parse(color="white", shape="round"))
    pill = result["pills"][0]
    assert pill["mapping_code"] == "K-000002" and pill["hints_conflict"] is False  # the untrained model is unsure
    assert pill["topk"][0]["hint_match"] == {"imprint": None, "color": "match", "shape": "match"}
    assert pill["ranking_changed"] == (plain["mapping_code"] != "K-000002")
    assert result["hints"] == {"imprint": "", "colors": ["하양"], "shape": "원형"}
    against = predictor.predict(photo, mode="single", hints=Hints.parse(color="blue"))["pills"][0]
    assert against["hints_conflict"] is True and against["conflicts"] == ["color"]


def test_cli_predict_takes_hints_and_names_an_unknown_word(exp_dir: Path, tmp_path: Path, capsys) -> None:
    photo = pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])
    assert cli_main(["predict", str(photo), "--exp", str(exp_dir), "--mode", "single", "--json",
                     "--color", "white", "--set", "inference.imprint.enabled=false"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["hints"]["colors"] == ["하양"]
    assert cli_main(["predict", str(photo), "--exp", str(exp_dir), "--shape", "star-ish"]) == 2


def test_cli_lines_say_unknown_and_what_would_settle_a_look_alike():
    from pillsnap.infer.cli import format_result

    near = [{"mapping_code": c, "name": c, "probability": p} for c, p in (("K-000002", 0.6), ("K-000001", 0.3))]
    result = {"image": "p.png", "mode_used": "combo", "num_pills": 2, "single_confidence": None,
              "fallback_reason": "multi_object_hint", "pills": [
                  {"mapping_code": None, "name": "", "probability": 0.6, "bbox": [1, 2, 3, 4], "unknown": True,
                   "unknown_reason": "not a known drug", "topk": near, "imprint_read": None},
                  {"mapping_code": "K-000001", "name": "drug 1", "probability": 0.3, "bbox": [5, 6, 7, 8],
                   "unknown": False, "topk": near, "imprint_read": "", "imprint_unresolved": True,
                   "ranking_changed": False}]}
    lines = format_result(result).splitlines()
    assert lines[1].startswith("  #1 unknown pill (nearest known: K-000002, K-000001)")
    assert "why unknown: not a known drug" in lines[2]
    assert lines[3].startswith("  #2 K-000001 drug 1 p=0.300") and lines[4].endswith("imprint read: nothing legible")
    assert "photograph the other side" in lines[5]
    sure = {**result["pills"][1], "probability": 0.99997, "imprint_unresolved": False}
    assert "p=>0.999" in format_result({**result, "pills": [sure]})  # a posterior is never shown as certainty
    unlikely = {**sure, "probability": 0.0003}  # a 5,000-drug answer spread thin: never shown as impossible
    assert "p=<0.001" in format_result({**result, "single_confidence": 0.0002, "pills": [unlikely]})
    assert "single_conf=<0.001" in format_result({**result, "single_confidence": 0.0002, "pills": [unlikely]})
    sets = {**sure, "prediction_set": near, "set_coverage": 0.95, "sure": False,
            "set_note": "one of K-000002 or K-000001 (at 95% confidence): photograph the other side of the pill"}
    lines = format_result({**result, "pills": [sets, {**sure, "prediction_set": near[:1], "sure": True,
                                                       "set_coverage": 0.95}]}).splitlines()
    assert lines[1].endswith("[one of 2 at 95%] bbox=[5, 6, 7, 8]") and lines[2].strip().startswith("set: one of")
    assert [line for line in lines if line.startswith("  #2")][0].endswith("[sure at 95%] bbox=[5, 6, 7, 8]")
    # a set of several already says what would settle it: the unresolved imprint does not say it again
    unresolved = format_result({**result, "pills": [{**sets, "imprint_unresolved": True}]})
    assert unresolved.count("photograph the other side") == 1 and "set: one of" in unresolved
    back = [{**near[1], "mapping_code": "K-000003", "recalled_by_imprint": True}, *near]
    recalled = format_result({**result, "pills": [{**sure, "topk": back, "imprint_read": "KEF"}]})
    assert "imprint read: 'KEF'" in recalled and "brought back by its imprint from below the top candidates: " \
        "K-000003" in recalled


def test_auto_reads_imprints_only_on_the_pills_it_answers(predictor: Predictor, tmp_path: Path,
                                                          monkeypatch) -> None:
    """Routing looks at the classifier alone: a photo routed to combo is not read as a whole first."""
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    boxes = np.array([[70, 100, 30, 24, 0.9], [10, 10, 30, 24, 0.8]], dtype=float)
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: boxes)
    predictor.settings.single_confidence_threshold = 0.0
    crops = []

    class CountingReader(StandInEvidence):
        def read(self, crop, topk):
            crops.append(crop.size)
            return None

    monkeypatch.setattr(predictor, "evidence", CountingReader())
    result = predictor.predict(photo, mode="auto")
    assert result["mode_used"] == "combo" and len(crops) == 2  # the two detected pills, not the whole photo
    crops.clear()
    assert predictor.predict(photo, mode="single")["num_pills"] == 1 and len(crops) == 1


def test_predict_pipeline_defaults_come_from_the_config(predictor: Predictor, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(predictor, "predict", lambda image, mode=None, conf_threshold=None: seen.update(
        mode=mode, conf=conf_threshold) or {})
    predict_pipeline(np.zeros((8, 8, 3), dtype=np.uint8), predictor=predictor)
    assert seen == {"mode": None, "conf": None}  # None: the predictor takes inference.mode / conf_threshold


def test_the_imprint_check_answers_a_foreign_imprint_unknown_and_follows_its_config_key(tmp_path: Path) -> None:
    """inference.imprint.unknown_check: every pill is read, and a legible imprint like none of the candidates'
    answers "unknown pill"; with the key off the same read leaves the drug named (and unresolved)."""
    from pillsnap.infer.imprint import ImprintRead

    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    save_json(root / "checkpoints" / "classes.json", {"class_names": CODES, "class_map": {
        c: {"name": f"drug {i}", "print_front": imprint} for i, (c, imprint) in enumerate(zip(CODES, ("AB1", "CD2",
                                                                                              "EF3"), strict=True))}})
    photo = pill_photo(tmp_path / "one.png", [(40, 60, 40, 30)])

    class Reads(StandInEvidence):  # stands in for the reader: a confident, legible read no known drug carries
        def __init__(self, text: str) -> None:
            self.text, self.calls = text, 0

        def read(self, crop, topk):
            self.calls += 1
            return ImprintRead(self.text, 0.95, 0.0, 0.01, True)

    answers, predictors = {}, {}
    for on in (True, False):
        predictor = Predictor(root, _cfg(root, f"inference.imprint.unknown_check={str(on).lower()}"), device="cpu")
        assert (predictor.known_imprints is not None) is on and predictor.evidence.check_unknown is on
        predictor.evidence = Reads("XYZ")
        answers[on], predictors[on] = predictor.predict(photo, mode="single")["pills"][0], predictor
    assert answers[True]["unknown"] is True and answers[True]["mapping_code"] is None
    assert "'XYZ'" in answers[True]["unknown_reason"] and answers[True]["unknown_by"] == "imprint"
    assert answers[True]["prediction_set"] in (None, [])
    assert answers[False]["unknown"] is False and answers[False]["unknown_by"] is None
    predictors[True].evidence = Reads("CD2")  # a known drug's imprint: named, whatever the classifier's order
    assert predictors[True].predict(photo, mode="single")["pills"][0]["mapping_code"] == "K-000002"


def test_a_calibration_from_before_the_likelihoods_is_answered_without_them(tmp_path: Path, caplog) -> None:
    """The evidence scale and the prediction sets were fit with the weights the calibration records: one that
    records none was fit without the candidates' likelihoods, and the predictor leaves them out (and says so)."""
    from pillsnap.infer.thresholds import THRESHOLDS, WEIGHTS

    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    ckpts = root / "checkpoints"
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "evidence_scale": 0.5})
    with caplog.at_level("WARNING"):
        old = Predictor(root, _cfg(root), device="cpu")
    assert old.weights["single"].likelihood == 0.0
    assert old.weights["single"].imprint == pytest.approx(WEIGHTS.imprint * 0.5)
    assert old.thresholds.foreign_likelihood_gap == math.inf  # its sets were calibrated without that path
    assert "predates the candidates' likelihoods" in caplog.text
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "evidence_scale": 0.5, "likelihood_weight": 2.0,
                                           "likelihood_cap": 5.0})
    caplog.clear()
    with caplog.at_level("WARNING"):
        fitted = Predictor(root, _cfg(root), device="cpu")
    assert (fitted.weights["single"].likelihood, fitted.weights["single"].likelihood_cap) == (1.0, 5.0)  # 2.0 at 0.5
    assert "fit against the recogniser's reading as an exact string" in caplog.text  # no reading_reference
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "likelihood_weight": 2.0, "imprint_recall": True,
                                           "reading_reference": "imprint"})
    caplog.clear()
    with caplog.at_level("WARNING"):
        Predictor(root, _cfg(root), device="cpu")
    assert "reading" not in caplog.text and "predates" not in caplog.text  # fit as answered now
    assert fitted.thresholds.foreign_likelihood_gap == THRESHOLDS.foreign_likelihood_gap
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "likelihood_weight": "heavy"})
    with pytest.raises(ValueError, match="calibration.json: likelihood_weight must be a number, got 'heavy'"):
        Predictor(root, _cfg(root), device="cpu")


def test_a_drug_below_the_top_k_comes_back_when_its_imprint_is_read_surely(tmp_path: Path, caplog) -> None:
    """The predictor keeps aside the drugs after its top-k that the classifier has not ruled out, and a sure read of
    one's imprint brings it back as the answer, marked recalled_by_imprint, through predict and its JSON."""
    from pillsnap.infer.imprint import ImprintRead

    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    save_json(root / "checkpoints" / "classes.json", {"class_names": CODES, "class_map": {
        c: {"name": f"drug {i}", "print_front": imprint} for i, (c, imprint) in enumerate(zip(CODES, ("AB1", "CD2",
                                                                                              "EF3"), strict=True))}})
    photo = pill_photo(tmp_path / "one.png", [(40, 60, 40, 30)])
    predictor = Predictor(root, _cfg(root, "inference.topk=1"), device="cpu")
    classified = predictor.classify([Image.open(photo).convert("RGB")])[0]
    assert len(classified.topk) == 1 and len(classified.reserve) == 2  # an untrained model rules nothing out
    last = classified.reserve[-1]["mapping_code"]
    imprint = {"K-000001": "AB1", "K-000002": "CD2", "K-000003": "EF3"}[last]

    class Reads(StandInEvidence):
        def read(self, crop, topk):
            return ImprintRead(imprint, 0.97, 0.0, 0.01, True)

    predictor.evidence = Reads()
    pill = predictor.predict(photo, mode="single")["pills"][0]
    assert pill["mapping_code"] == last and pill["unknown"] is False
    assert pill["topk"][0]["recalled_by_imprint"] is True and len(pill["topk"]) == 2
    json.dumps(pill)  # the answer stays JSON
    # a calibration fit before the recall (its scale and sets weighed the top-k alone) keeps nothing aside
    ckpts = root / "checkpoints"
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "likelihood_weight": 1.0, "likelihood_cap": 8.0})
    crop = Image.open(photo).convert("RGB")
    with caplog.at_level("WARNING"):
        old = Predictor(root, _cfg(root, "inference.topk=1"), device="cpu")
    assert old.classify([crop])[0].reserve == () and "predates drugs below the top-k" in caplog.text
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "likelihood_weight": 1.0, "likelihood_cap": 8.0,
                                           "imprint_recall": True})
    assert len(Predictor(root, _cfg(root, "inference.topk=1"), device="cpu").classify([crop])[0].reserve) == 2
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "likelihood_weight": 1.0, "imprint_recall": "yes"})
    with pytest.raises(ValueError, match="calibration.json: imprint_recall must be true or false, got 'yes'"):
        Predictor(root, _cfg(root), device="cpu")


def test_a_ctrl_c_during_a_write_lands_after_it(monkeypatch) -> None:
    """A write blocked on a full pipe and cut by Ctrl-C would leave half a JSON element before the list is closed:
    the interrupt is held back until the element is written."""
    import signal

    from pillsnap.infer import cli

    written: list[str] = []

    def interrupted_print(*parts, end="\n", **kwargs):
        text = " ".join(map(str, parts)) + end
        written.append(text[:5])
        if len(written) == 1:  # Ctrl-C in the middle of the first write, to this thread: one sent to the process
            signal.raise_signal(signal.SIGINT)  # can be taken by a native thread (torch's, ONNX Runtime's) first
        written.append(text[5:])

    monkeypatch.setattr(cli, "print", interrupted_print, raising=False)
    printer = cli.Printer(True)
    # Python's own Ctrl-C handler, as a command started from a terminal has: a suite started in the background by a
    # script without job control (`cmd &`) runs with SIGINT ignored, which the held block rightly leaves ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            printer.add({"image": "a.png", "pills": [{"name": "약"}]})
    finally:
        signal.signal(signal.SIGINT, before)
    printer.close()
    assert json.loads("".join(written)) == [{"image": "a.png", "pills": [{"name": "약"}]}]


def test_an_uncalibrated_run_says_what_it_does_without_its_calibration(exp_dir: Path, caplog) -> None:
    """No calibration: raw probabilities, no prediction sets, no unknown pill by its look; the imprint check, which
    needs none, still answers unknown by the imprint, and the log says so rather than 'no pill is unknown'."""
    with caplog.at_level("INFO", logger="pillsnap.infer.artefacts"):
        Predictor(exp_dir, _cfg(exp_dir), device="cpu")
    said = [r.getMessage() for r in caplog.records if "no calibration" in r.getMessage()]
    assert len(said) == 1 and "answers carry no prediction set" in said[0]
    assert "the imprint check still answers a pill whose imprint no look-alike carries as unknown" in said[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="pillsnap.infer.artefacts"):
        Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.unknown_check=false"), device="cpu")
    assert "imprint check" not in " ".join(r.getMessage() for r in caplog.records)


def test_a_predictor_without_a_calibration_for_its_weights_warns(tmp_path: Path, caplog) -> None:
    """Without a calibration no pill is answered as unknown by its look: such a predictor names a drug for whatever
    it is shown (a blank photo, a coin), and said so only at INFO."""
    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    with caplog.at_level(logging.WARNING):
        Predictor(root, _cfg(root), device="cpu")
    [warned] = [r.getMessage() for r in caplog.records if "no calibration for" in r.getMessage()]
    assert "no pill is answered as unknown by its look" in warned and "pillsnap calibrate" in warned
