"""Enrolling a new drug without retraining (pillsnap.infer.enrol / enrolment, `pillsnap enrol`): enrol, answer by
name, list, remove, a restart, a served predictor picking it up, and every bad input refused with nothing changed.

The experiment is the untrained tiny one of test_infer_pipeline, given a calibration: class Gaussians fit on its
own features of three colours of pill, so that a pill of a fourth colour is a new drug to it."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import StandInEvidence
from PIL import Image, ImageDraw
from test_infer_pipeline import CODES, _cfg, features_of, make_exp_dir

from pillsnap.cli import main as cli_main
from pillsnap.infer.enrol import DrugInfo, enrol, listing, look_alike, remove
from pillsnap.infer.enrolment import (
    ENROLMENT_FILE,
    PROBE_FILE,
    Enrolled,
    EnrolmentError,
    Probe,
    merge_posterior,
    taken_from_trained,
)
from pillsnap.infer.pipeline import Predictor
from pillsnap.infer.preprocess import crop_pill, locate_pill
from pillsnap.metrics.novelty import ClassGaussians
from pillsnap.utils import save_json
from pillsnap.utils.io import file_sha256

TRAINED_COLOURS = [(200, 40, 120), (40, 160, 60), (40, 60, 200)]  # K-000001..3
NEW_COLOUR, NEW_CODE = (230, 200, 30), "K-900001"


def pill(path: Path, colour: tuple[int, int, int], seed: int, shape: str = "ellipse") -> Path:
    """A pill of `colour` on a plain backdrop, its place, size and shade varied by `seed`."""
    rnd = random.Random(seed)
    image = Image.new("RGB", (120, 160), (190, 190, 185))
    x, y, w, h = rnd.randint(20, 50), rnd.randint(30, 80), rnd.randint(28, 40), rnd.randint(22, 32)
    fill = tuple(min(255, max(0, c + rnd.randint(-12, 12))) for c in colour)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)((x, y, x + w, y + h), fill=fill)
    image.save(path)
    return path


def calibrate(exp_dir: Path, photo_dir: Path) -> None:
    """What `pillsnap calibrate` leaves for the feature_distance rule: class Gaussians over the classifier's
    features of the trained colours, and a calibration.json naming the weights and the feature file."""
    predictor = Predictor(exp_dir, _cfg(exp_dir), device="cpu")
    feats, labels = [], []
    for label, colour in enumerate(TRAINED_COLOURS):
        for seed in range(12):
            image = Image.open(pill(photo_dir / f"fit_{label}_{seed}.png", colour, 1000 + seed)).convert("RGB")
            crop = crop_pill(image, locate_pill(image), predictor.crop_margin)
            with torch.no_grad():
                feats.append(predictor.classifier(predictor.transform(crop)[None])[1][0].numpy())
            labels.append(label)
    gaussians = ClassGaussians.fit(np.stack(feats), np.asarray(labels))
    ckpt = exp_dir / "checkpoints"
    gaussians.save(ckpt / "unknown_features.npz")
    threshold = float(np.quantile(gaussians.score(np.stack(feats)), 0.95)) * 2
    save_json(ckpt / "calibration.json", {
        "temperature": 1.0, "unknown_rule": "feature_distance",
        "unknown_thresholds": {"feature_distance": threshold, "probability": None}, "unknown_keep_correct": 0.95,
        "features_file": "unknown_features.npz", "features_sha256": file_sha256(ckpt / "unknown_features.npz"),
        "classifier_sha256": file_sha256(ckpt / "classification_best.pt")})


@pytest.fixture(scope="module")
def base_exp(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("enrol_exp")
    exp = make_exp_dir(root / "exp", with_detector=False)
    calibrate(exp, root)
    return exp


@pytest.fixture()
def exp_dir(base_exp: Path, tmp_path: Path) -> Path:
    """A fresh copy per test: enrolments write into the experiment."""
    return Path(shutil.copytree(base_exp, tmp_path / "exp"))


@pytest.fixture()
def predictor(exp_dir: Path) -> Predictor:
    return Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")


def photos(folder: Path, colour: tuple[int, int, int], seeds: range, shape: str = "rectangle") -> list[Path]:
    folder.mkdir(exist_ok=True)
    return [pill(folder / f"p{seed}.png", colour, seed, shape) for seed in seeds]


def new_drug() -> DrugInfo:
    return DrugInfo.parse(NEW_CODE, "새약 10mg", "NEW", "10", "yellow", "square")


def store_state(exp_dir: Path) -> bytes | None:
    path = exp_dir / "checkpoints" / ENROLMENT_FILE
    return path.read_bytes() if path.is_file() else None


def answer(predictor: Predictor, photo: Path) -> dict:
    return predictor.predict(photo, mode="single")["pills"][0]


def test_enrolled_drug_is_answered_by_name_with_its_attributes(predictor: Predictor, tmp_path: Path) -> None:
    new = photos(tmp_path / "new", NEW_COLOUR, range(5))
    before = answer(predictor, pill(tmp_path / "probe.png", NEW_COLOUR, 99, "rectangle"))
    assert before["mapping_code"] in (CODES + [None])  # not answerable before
    report = enrol(predictor, new_drug(), new)
    assert (report["mapping_code"], report["n_photos"], report["replaced"]) == (NEW_CODE, 5, False)
    assert all(c["pill"] == "located on the backdrop" for c in report["crops"])
    after = answer(predictor, tmp_path / "probe.png")
    assert (after["mapping_code"], after["name"], after["unknown"]) == (NEW_CODE, "새약 10mg", False)
    probs = [c["probability"] for c in after["topk"]]
    assert sum(probs) <= 1.0 + 1e-5 and probs == sorted(probs, reverse=True)
    entry = predictor.class_map[NEW_CODE]  # joins the matching: imprints, colours and shape as label words
    assert (entry["print_front"], entry["print_back"], entry["colors"], entry["shape"]) == ("NEW", "10", ["노랑"],
                                                                                            "사각형")
    known = answer(predictor, pill(tmp_path / "known.png", TRAINED_COLOURS[1], 77))
    assert known["mapping_code"] != NEW_CODE  # a trained drug's photo is not taken by the new one


def test_list_remove_and_restart(exp_dir: Path, predictor: Predictor, tmp_path: Path, monkeypatch) -> None:
    enrol(predictor, new_drug(), photos(tmp_path / "new", NEW_COLOUR, range(5)))
    probe = pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle")
    restarted = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")
    assert answer(restarted, probe)["mapping_code"] == NEW_CODE and NEW_CODE in restarted.class_names
    listed = listing(exp_dir)
    assert listed["stale"] is None and [d["mapping_code"] for d in listed["drugs"]] == [NEW_CODE]
    assert listed["drugs"][0]["n_photos"] == 5
    # a served predictor holds its classifier's hash: listing and removing do not hash the checkpoint again
    import pillsnap.infer.enrolment as enrolment_module
    import pillsnap.utils.io as io_module  # where hashing lives (the store's file is read by utils.io.read_hashed)

    hashed: list = []
    sha = restarted.classifier_sha256
    for module in (enrolment_module, io_module):
        monkeypatch.setattr(module, "file_sha256", lambda path, f=module.file_sha256: (hashed.append(path), f(path))[1])
    assert listing(exp_dir, restarted.classifier_path, sha) == listed
    assert remove(exp_dir, NEW_CODE, restarted.classifier_path, sha) == {"removed": NEW_CODE, "name": "새약 10mg"}
    # the store's own small feature file is hashed, the weights are not
    assert hashed and not any(Path(p).suffix == ".pt" for p in hashed)
    monkeypatch.undo()
    assert listing(exp_dir)["drugs"] == []
    assert answer(restarted, probe)["mapping_code"] != NEW_CODE  # the running one drops it on its next photo
    assert NEW_CODE not in restarted.class_names and restarted.class_names == CODES
    with pytest.raises(EnrolmentError, match="K-900001 is not enrolled"):
        remove(exp_dir, NEW_CODE)


def test_a_running_predictor_picks_up_an_enrolment_made_elsewhere(exp_dir: Path, predictor: Predictor,
                                                                  tmp_path: Path) -> None:
    served = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")
    probe = pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle")
    assert answer(served, probe)["mapping_code"] != NEW_CODE
    enrol(predictor, new_drug(), photos(tmp_path / "new", NEW_COLOUR, range(5)))  # e.g. the CLI, another process
    assert answer(served, probe)["mapping_code"] == NEW_CODE


@pytest.mark.parametrize(("case", "kind", "message"), [
    ("trained", "trained_class", "K-000002 is a trained class (drug 1)"),
    ("too_few", "photo_count", "2 photo(s) given: enrolling needs 3 to 10"),
    ("no_pill", "no_pill", "blank.png: no pill found"),
    ("corrupt", "bad_photo", "corrupt.png cannot be read as an image"),
    ("missing", "bad_photo", "gone.png: no such file"),
    ("bad_code", "bad_field", "code 'X-1' is not a drug code"),
    ("bad_colour", "bad_field", "unknown colour 'plaid'"),
])
def test_bad_input_is_refused_and_changes_nothing(predictor: Predictor, exp_dir: Path, tmp_path: Path, case: str,
                                                  kind: str, message: str) -> None:
    good = photos(tmp_path / "new", NEW_COLOUR, range(5))
    info, batch = new_drug(), list(good)
    if case == "trained":
        info = DrugInfo.parse("K-000002", "dup")
    elif case == "too_few":
        batch = good[:2]
    elif case == "no_pill":
        Image.new("RGB", (120, 160), (190, 190, 185)).save(tmp_path / "blank.png")
        batch[2] = tmp_path / "blank.png"
    elif case == "corrupt":
        (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        batch[1] = tmp_path / "corrupt.png"
    elif case == "missing":
        batch[4] = tmp_path / "gone.png"
    before = store_state(exp_dir)
    with pytest.raises(EnrolmentError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        if case == "bad_code":
            DrugInfo.parse("X-1", "x")
        elif case == "bad_colour":
            DrugInfo.parse(NEW_CODE, "x", color="plaid")
        enrol(predictor, info, batch)
    assert err.value.kind == kind and store_state(exp_dir) == before and NEW_CODE not in predictor.class_names


def test_combination_photo_gives_the_pill_least_like_any_known_drug(predictor: Predictor, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """Several pills on a photo go to the detector, and the new drug is the one no known drug is near."""
    combos = []
    for seed in range(5):
        image = Image.open(pill(tmp_path / f"c{seed}.png", NEW_COLOUR, seed, "rectangle")).convert("RGB")
        ImageDraw.Draw(image).ellipse((70, 110, 105, 140), fill=TRAINED_COLOURS[0])  # a known drug beside it
        image.save(tmp_path / f"c{seed}.png")
        combos.append(tmp_path / f"c{seed}.png")

    def detect(image: Image.Image, conf: float, forward: object = None) -> np.ndarray:
        known_box = [70, 110, 36, 31, 0.9]
        box = locate_pill(image.crop((0, 0, 68, 160)))  # the new pill: left of the known one
        return np.array([known_box, [*box, 0.8]], dtype=float)

    monkeypatch.setattr(Predictor, "has_detector", property(lambda self: True))
    monkeypatch.setattr(predictor, "detect", detect)
    report = enrol(predictor, new_drug(), combos)
    assert all(c["pill"].startswith("detected, 2 of 2 pills") for c in report["crops"])
    assert answer(predictor, pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle"))["mapping_code"] == NEW_CODE


def test_a_box_that_may_hold_no_pill_is_never_enrolled_as_the_drug(predictor: Predictor, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A dish's rim boxed faintly is "least like any known drug" too: chosen, the photo is refused, not enrolled
    as the drug; the new pill boxed surely is chosen and enrolled."""
    from pillsnap.infer.box_check import BoxCheck

    combos = []
    for seed in range(5):
        image = Image.open(pill(tmp_path / f"c{seed}.png", NEW_COLOUR, seed, "rectangle")).convert("RGB")
        ImageDraw.Draw(image).ellipse((70, 110, 105, 140), fill=TRAINED_COLOURS[0])
        image.save(tmp_path / f"c{seed}.png")
        combos.append(tmp_path / f"c{seed}.png")

    new_pill_conf = 0.8

    def detect(image: Image.Image, conf: float, forward: object = None) -> np.ndarray:
        box = locate_pill(image.crop((0, 0, 68, 160)))
        return np.array([[70, 110, 36, 31, 0.9], [*box, new_pill_conf]], dtype=float)

    monkeypatch.setattr(Predictor, "has_detector", property(lambda self: True))
    monkeypatch.setattr(predictor, "detect", detect)
    monkeypatch.setattr(predictor, "box_check", BoxCheck(tuple(np.linspace(0.5, 0.99, 99)), 0.02))
    new_pill_conf = 0.35  # the new drug's pill boxed faintly: the choice is refused, not made among the others
    with pytest.raises(EnrolmentError, match="may be no pill"):
        enrol(predictor, new_drug(), combos)
    assert NEW_CODE not in predictor.class_names
    new_pill_conf = 0.8
    report = enrol(predictor, new_drug(), combos)
    assert all(c["pill"].startswith("detected, 2 of 2 pills") for c in report["crops"])
    assert answer(predictor, pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle"))["mapping_code"] == NEW_CODE


def test_already_enrolled_needs_replace(predictor: Predictor, exp_dir: Path, tmp_path: Path) -> None:
    enrol(predictor, new_drug(), photos(tmp_path / "a", NEW_COLOUR, range(5)))
    before = store_state(exp_dir)
    again = photos(tmp_path / "b", NEW_COLOUR, range(20, 24))
    with pytest.raises(EnrolmentError, match="already enrolled .*--replace") as err:
        enrol(predictor, new_drug(), again)
    assert err.value.kind == "already_enrolled" and store_state(exp_dir) == before
    report = enrol(predictor, new_drug(), again, replace=True)
    assert report["replaced"] and [d["n_photos"] for d in listing(exp_dir)["drugs"]] == [4]


def test_look_alike_photos_need_force_and_say_which_drug(predictor: Predictor, exp_dir: Path,
                                                         tmp_path: Path) -> None:
    same = photos(tmp_path / "new", NEW_COLOUR, range(5))
    enrol(predictor, new_drug(), same)
    before = store_state(exp_dir)
    twin = DrugInfo.parse("K-900002", "twin")
    with pytest.raises(EnrolmentError, match=r"look like K-900001 \(새약 10mg\): \d of 5 lie nearer") as err:
        enrol(predictor, twin, same)
    assert err.value.kind == "look_alike" and store_state(exp_dir) == before
    report = enrol(predictor, twin, same, force=True)
    assert report["look_alike"]["mapping_code"] == NEW_CODE
    assert [d["mapping_code"] for d in listing(exp_dir)["drugs"]] == [NEW_CODE, "K-900002"]


def test_look_alike_rule() -> None:
    own = np.array([10.0, 10.0, 10.0, 10.0])
    assert look_alike(own, np.array([20.0, 30, 5, 40]), np.zeros(4, int), ["K-1"], {}) is None
    found = look_alike(own, np.array([5.0, 6, 7, 40]), np.array([1, 1, 0, 1]), ["K-1", "K-2"], {"K-2": {"name": "b"}})
    assert found == {"mapping_code": "K-2", "name": "b", "photos_nearer": 2, "photos": 4, "distance": 5.5,
                     "own_distance": 10.0}


def test_merged_probabilities_stay_one_distribution() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    trained = np.array([[100.0, 200, 300], [400.0, 500, 600]])
    enrolled = np.array([[900.0], [50.0]])
    merged = merge_posterior(probs, trained, enrolled, softness=20.0)
    assert merged.shape == (2, 4) and np.allclose(merged.sum(1), 1.0)
    assert merged[0].argmax() == 0 and merged[0, 3] < 1e-6  # far enrolled mean: the classifier's answer stands
    assert merged[1].argmax() == 3 and merged[1, :3].sum() < 1e-3  # nearest by far: the enrolled drug


def test_what_an_enrolment_takes_from_the_trained_drugs() -> None:
    """A probe crop answered right by the trained classifier is taken when the new drug's posterior beats what the
    classifier's top drug keeps; a crop another enrolled drug already answered was not the trained drugs' to lose."""
    gaussians = ClassGaussians(np.array([[0.0, 0.0], [100.0, 0.0]], np.float32), np.eye(2, dtype=np.float32))
    features = np.array([[2.0, 0.0], [-2.0, 0.0], [2.0, 0.5], [100.0, 1.0]], np.float32)
    probe = Probe(features, np.array([0, 0, 0, 1]), np.full(4, 0.9, np.float32), np.array([True, True, False, True]))

    def drug(code: str, mean: list[float]) -> tuple[dict, np.ndarray]:
        return {"mapping_code": code, "n_photos": 5, "spread": 1.0}, np.asarray(mean, np.float32)

    near, far = drug("K-900001", [3.0, 0.0]), drug("K-900002", [50.0, 60.0])
    taken = taken_from_trained(probe, gaussians, Enrolled(), Enrolled().with_drug(*near), "K-900001", 100.0)
    # the second lies nearer its own drug's mean; the third lies at the new one but was answered wrong already
    assert taken.tolist() == [True, False, False, False]
    assert not taken_from_trained(probe, gaussians, Enrolled(), Enrolled().with_drug(*far), "K-900002", 100.0).any()
    # with the near drug enrolled before, a second one beside it takes nothing the trained drugs still had
    before = Enrolled().with_drug(*near)
    twin = drug("K-900003", [3.0, 0.5])
    assert not taken_from_trained(probe, gaussians, before, before.with_drug(*twin), "K-900003", 100.0).any()


def _with_probe(exp_dir: Path, probe: Probe) -> None:
    """The probe `pillsnap calibrate` writes, named in calibration.json by hash."""
    ckpt = exp_dir / "checkpoints"
    probe.save(ckpt / PROBE_FILE)
    stored = json.loads((ckpt / "calibration.json").read_text(encoding="utf-8"))
    stored.update(validation_probe_file=PROBE_FILE, validation_probe_sha256=file_sha256(ckpt / PROBE_FILE))
    save_json(ckpt / "calibration.json", stored)


def test_an_enrolment_that_takes_trained_drugs_answers_needs_force(exp_dir: Path, tmp_path: Path) -> None:
    """Photos unlike every trained drug's mean pass the look-alike check; when the calibration's validation pills
    of a trained drug look like them, the enrolment would answer those pills as the new drug: refused, with the
    share and the drug named and nothing written, unless forced; the report says what was taken either way."""
    predictor = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")
    new = photos(tmp_path / "new", NEW_COLOUR, range(5))
    whiten = ClassGaussians.load(features_of(exp_dir)).whiten

    def features(paths: list[Path]) -> np.ndarray:  # whitened, as calibration keeps the probe
        crops = []
        for path in paths:
            image = Image.open(path).convert("RGB")
            crops.append(crop_pill(image, locate_pill(image), predictor.crop_margin))
        return predictor.forward(crops)[1].numpy() @ whiten

    lookers = features(photos(tmp_path / "lookers", NEW_COLOUR, range(20, 30)))  # "validation pills of K-000001"
    calibrated = _cfg(exp_dir, "inference.imprint.enabled=false")
    _with_probe(exp_dir, Probe(lookers, np.zeros(10, np.int64), np.full(10, 0.6, np.float32), np.ones(10, bool)))
    predictor = Predictor(exp_dir, calibrated, device="cpu")
    before = store_state(exp_dir)
    with pytest.raises(EnrolmentError, match=r"enrolling K-900001 would take answers from the trained drugs: \d+ "
                                             r"of the 10 validation pills .* of K-000001") as err:
        enrol(predictor, new_drug(), new)
    assert err.value.kind == "takes_known" and store_state(exp_dir) == before
    report = enrol(predictor, new_drug(), new, force=True)
    assert report["look_alike"] is None  # the photos stand apart from every trained mean
    takes = report["takes_known"]
    assert takes["measured"] and takes["refused"] and takes["of"] == 10 and takes["crops"] >= 2
    assert takes["mapping_code"] == "K-000001" and takes["share"] == pytest.approx(takes["crops"] / 10, abs=1e-4)
    # a probe of K-000001's pills as they look: nothing taken, no force needed
    remove(exp_dir, NEW_CODE)
    own = features(photos(tmp_path / "own", TRAINED_COLOURS[0], range(40, 50), "ellipse"))
    _with_probe(exp_dir, Probe(own, np.zeros(10, np.int64), np.full(10, 0.6, np.float32), np.ones(10, bool)))
    predictor = Predictor(exp_dir, calibrated, device="cpu")
    takes = enrol(predictor, new_drug(), new)["takes_known"]
    assert takes["measured"] and takes["crops"] == 0 and not takes["refused"]
    # without a probe (a calibration from before it) nothing is measured, and the answer says why
    remove(exp_dir, NEW_CODE)
    (exp_dir / "checkpoints" / PROBE_FILE).write_bytes(b"not the probe")
    takes = enrol(Predictor(exp_dir, calibrated, device="cpu"), new_drug(), new)["takes_known"]
    assert takes == {"measured": False, "why": f"{exp_dir / 'checkpoints' / PROBE_FILE} is missing or not the file "
                                               "the calibration names"}
    # a probe of an older layout, named by its hash: not measured, and no traceback (nor a 500 over the API)
    remove(exp_dir, NEW_CODE)
    older = exp_dir / "checkpoints" / PROBE_FILE
    np.savez(str(older), features=own, labels=np.zeros(10, np.int64))
    stored = json.loads((exp_dir / "checkpoints" / "calibration.json").read_text(encoding="utf-8"))
    save_json(exp_dir / "checkpoints" / "calibration.json", {**stored, "validation_probe_sha256": file_sha256(older)})
    takes = enrol(Predictor(exp_dir, calibrated, device="cpu"), new_drug(), new)["takes_known"]
    assert not takes["measured"] and "cannot be read as a probe" in takes["why"]


def test_the_refusal_rule_counts_two_crops_and_a_quarter_of_a_drug_or_one_percent() -> None:
    from pillsnap.infer.enrolment import refuses

    labels = np.repeat(np.arange(50), 4)  # 50 drugs, 4 probe crops each, all answered right: 200
    probe = Probe(np.zeros((200, 2), np.float32), labels, np.ones(200, np.float32), np.ones(200, bool))

    def taking(*rows: int) -> np.ndarray:
        taken = np.zeros(200, bool)
        taken[list(rows)] = True
        return taken

    assert not refuses(taking(0), probe)  # one pill: never
    assert refuses(taking(0, 1), probe)  # half of one drug's
    assert not refuses(taking(0, 4), probe)  # one of two drugs' each, 1% of all
    assert refuses(taking(0, 4, 8), probe)  # 1.5% of all


def test_stale_enrolment_is_refused_with_a_clear_message(predictor: Predictor, exp_dir: Path, tmp_path: Path,
                                                         caplog) -> None:
    enrol(predictor, new_drug(), photos(tmp_path / "new", NEW_COLOUR, range(5)))
    store = exp_dir / "checkpoints" / ENROLMENT_FILE
    stored = json.loads(store.read_text(encoding="utf-8"))
    stored["classifier_sha256"] = "0" * 64  # as if the classifier had been retrained since
    store.write_text(json.dumps(stored), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        restarted = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")
    assert NEW_CODE not in restarted.class_names
    assert any("made for other classifier weights" in r.getMessage() for r in caplog.records)
    with pytest.raises(EnrolmentError, match="made for other classifier weights") as err:
        enrol(restarted, DrugInfo.parse("K-900003", "x"), photos(tmp_path / "other", (250, 120, 20), range(5)))
    assert err.value.kind == "stale"
    assert "other classifier weights" in listing(exp_dir)["stale"]
    remove(exp_dir, NEW_CODE)  # the way out: a stale drug can be removed
    assert listing(exp_dir)["drugs"] == []


@pytest.mark.parametrize("content", ['{"classifier_sha256": "x", "drugs": [', '["x"]', '{"drugs": [{"name": "a"}]}',
                                     '{"classifier_sha256": "x"}',
                                     '{"drugs": [{"mapping_code": "K-900001", "name": "a"}]}',
                                     '{"drugs": [{"mapping_code": "K-900001", "name": "a", "n_photos": 5, '
                                     '"spread": null}]}'])
def test_a_broken_store_is_named_and_left_alone_and_answers_go_on(predictor: Predictor, exp_dir: Path,
                                                                   tmp_path: Path, content: str, caplog,
                                                                   capsys) -> None:
    """A truncated or hand-edited enrolment.json: every prediction failed (a 500 at the API) and `pillsnap enrol
    --list` printed a traceback. Now answers go on without the enrolled drugs, each enrolment action refuses with
    one line naming the file, and the file is left as it was."""
    store = exp_dir / "checkpoints" / ENROLMENT_FILE
    store.write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        restarted = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")
        assert answer(restarted, pill(tmp_path / "p.png", NEW_COLOUR, 1))["mapping_code"] != NEW_CODE
    assert any(str(store) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for act in (lambda: listing(exp_dir), lambda: remove(exp_dir, NEW_CODE),
                lambda: enrol(restarted, new_drug(), photos(tmp_path / "new", NEW_COLOUR, range(5)))):
        with pytest.raises(EnrolmentError, match="enrolment.json") as err:
            act()
        assert err.value.kind == "store_broken"
    caplog.clear()
    assert cli_main(["enrol", "--exp", str(exp_dir), "--list"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(store) in errors[0] and "Traceback" not in capsys.readouterr().err
    assert store.read_text(encoding="utf-8") == content


def test_too_many_photos_are_refused_before_any_is_decoded(exp_dir: Path, tmp_path: Path, caplog) -> None:
    new = [str(p) for p in photos(tmp_path / "new", NEW_COLOUR, range(10))]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a photo")
    assert cli_main(["enrol", "--exp", str(exp_dir), "--code", NEW_CODE, "--name", "x", *new, str(junk)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "11 photo(s) given" in errors[0]
    assert store_state(exp_dir) is None


def test_enrol_cli(exp_dir: Path, tmp_path: Path, capsys, caplog) -> None:
    new = [str(p) for p in photos(tmp_path / "new", NEW_COLOUR, range(5))]
    base = ["enrol", "--exp", str(exp_dir)]
    assert cli_main([*base, "--code", NEW_CODE, "--name", "새약", "--color", "노랑", *new]) == 0
    assert f"enrolled {NEW_CODE} 새약 from 5 photos" in capsys.readouterr().out
    # enrolling answers nobody: no word about prediction sets (nor a "recalibrate" for nothing wrong)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "prediction set" in r.getMessage()]
    assert cli_main([*base, "--list", "--json"]) == 0
    assert [d["mapping_code"] for d in json.loads(capsys.readouterr().out)["drugs"]] == [NEW_CODE]
    caplog.clear()
    assert cli_main([*base, "--code", NEW_CODE, "--name", "again", *new]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "already enrolled" in errors[0]
    assert cli_main([*base, "--code", "K-900009", "--name", "x", str(tmp_path / "nope.png"), *new[:3]]) == 2
    assert cli_main([*base, "--list", "--remove", NEW_CODE]) == 2  # one action at a time
    assert cli_main([*base, "--remove", NEW_CODE]) == 0
    assert f"removed {NEW_CODE}" in capsys.readouterr().out


def test_the_demo_lines_say_what_obeying_the_look_alike_check_keeps():
    from pillsnap.eval.enrol_eval import format_enrolment

    known = {"single_accuracy": 0.8, "combo_all_right_rate": 0.5, "known_pill_accuracy": 0.9}
    figures = {"drugs": 2, "photos_per_drug": 5, "enrol_seconds_max": 0.3, "remaining_photos": 20, "accuracy": 0.9,
               "unknown_share": 0.05, "known_before": known, "known_after": {**known, "single_accuracy": 0.7},
               "known_crops_before": {}, "known_crops_after": {},
               "look_alike_check_obeyed": {"refused": ["K-000007"],
                                           "known_after": {**known, "single_accuracy": 0.79}}}
    lines = format_enrolment(figures)
    assert "single-photo accuracy 0.800 -> 0.700" in lines[1]
    assert lines[-1].startswith("enrolment   with the look-alike checks obeyed (K-000007 refused, not forced)")
    assert "known single-photo accuracy 0.800 -> 0.790" in lines[-1]
    assert not any("obeyed" in line for line in format_enrolment({**figures, "look_alike_check_obeyed": None}))
    assert not any("takes by its look" in line for line in lines)  # measured by no calibration probe: not said
    measured = {**figures, "per_drug": [
        {"mapping_code": "K-000007", "takes_known": {"measured": True, "crops": 3, "of": 95}},
        {"mapping_code": "K-000008", "takes_known": {"measured": False, "why": "no probe"}}]}
    said = [line for line in format_enrolment(measured) if "takes by its look" in line]
    assert len(said) == 1 and said[0].endswith("(the enrolment check's probe): K-000007 3 of 95")


def test_the_imprint_check_knows_an_enrolled_drugs_imprints(exp_dir: Path, predictor: Predictor,
                                                            tmp_path: Path) -> None:
    """A served predictor with the imprint check picks up an enrolled drug's imprints with the drug: its photos
    reading its imprint are named, a read none of its look-alikes carries is an unknown pill."""
    from pillsnap.infer.imprint import ImprintRead

    served = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.unknown_check=true"), device="cpu")
    assert served.check_unknown and "NEW" not in served.known_imprints.sides

    class Reads(StandInEvidence):  # stands in for the reader
        text = "NEW"

        def read(self, crop, topk):
            return ImprintRead(self.text, 0.95, 0.0, 0.01, True)

    served.evidence = Reads()
    probe = pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle")
    enrol(predictor, new_drug(), photos(tmp_path / "new", NEW_COLOUR, range(5)))
    named = answer(served, probe)  # the enrolment is picked up on this photo, with its imprints
    assert served.known_imprints.sides.get("NEW") == NEW_CODE and named["mapping_code"] == NEW_CODE
    Reads.text = "QJX"
    stranger = answer(served, probe)
    assert stranger["unknown_by"] == "imprint" and stranger["mapping_code"] is None


def test_the_enrolment_measure_is_bounded_on_a_real_sized_data_set() -> None:
    """`pillsnap demo --data-root <real tree>` measures enrolment on the drugs a stage left out: on the real data
    that is thousands of drugs and millions of photos, so a bounded random draw of them is enrolled and answered."""
    import pandas as pd

    from pillsnap.eval.enrol_eval import _plan

    rows = [{"mapping_code": f"K-{d:06d}", "image_type": "single", "split": "train" if i < 70 else "test",
             "image_path": f"/data/K-{d:06d}/{i}.png"} for d in range(60) for i in range(100)]
    manifest = pd.DataFrame(rows)
    trained = {f"K-{d:06d}" for d in range(10)}
    plan = _plan(manifest, trained, per_drug=5, seed=0, drugs=20, answered=60)
    assert len(plan) == 20 and not set(plan) & trained
    for code, (chosen, others) in plan.items():
        assert len(chosen) == 5 and all(p.startswith(f"/data/{code}/") and int(p.split("/")[-1][:-4]) < 70
                                        for p in chosen)  # enrolled from its training photos
        assert len(others) == 60 and not set(others) & set(chosen) and len(set(others)) == 60
    assert _plan(manifest, trained, per_drug=5, seed=0, drugs=20, answered=60) == plan  # the seed fixes the draw
    assert set(_plan(manifest, trained, per_drug=5, seed=1, drugs=20, answered=60)) != set(plan)
    few = _plan(manifest[manifest["mapping_code"] < "K-000013"], trained, per_drug=5, seed=0, drugs=20, answered=200)
    assert sorted(few) == ["K-000010", "K-000011", "K-000012"]  # fewer than the bound: every one, every photo
    assert all(len(others) == 95 for _, others in few.values())


def test_a_trained_drug_with_no_training_crop_shifts_no_mean(tmp_path: Path) -> None:
    """A drug in the classifier's class list with crops only in validation (a drug seen only in combination photos
    whose groups all went to val and test) has no mean to fit. The means keep saying which drug each is: a probe
    crop is measured against its own drug's mean, not its neighbour's (before, every later drug was off by one and
    the last one's crops raised IndexError, so every enrolment failed), and the look-alike names the right drug."""
    from pillsnap.infer.enrol import Neighbours

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    labels = np.repeat([0, 2, 3], 40)  # drug 1 has no training crop
    gaussians = ClassGaussians.fit(centres[labels] + rng.normal(0, 1, (len(labels), 2)), labels)
    assert list(gaussians.class_ids) == [0, 2, 3] and list(gaussians.rows_of(np.array([3, 1, 0]))) == [2, -1, 0]
    again = ClassGaussians.load(gaussians.save(tmp_path / "features.npz"))
    assert list(again.class_ids) == [0, 2, 3] and np.array_equal(again.means, gaussians.means)
    # the crops of the last drug and of the drug with no mean, answered right; the new drug far from both
    whitened = (centres[[3, 3, 1]] @ gaussians.whiten).astype(np.float32)
    probe = Probe(whitened, np.array([3, 3, 1]), np.full(3, 0.9, np.float32), np.ones(3, bool))
    far = ({"mapping_code": "K-900001", "n_photos": 5, "spread": 1.0}, np.array([-500.0, -500.0], np.float32))
    assert not taken_from_trained(probe, gaussians, Enrolled(), Enrolled().with_drug(*far), "K-900001", 10.0).any()
    near_last = ({"mapping_code": "K-900002", "n_photos": 5, "spread": 1.0}, np.array([50.5, 50.0], np.float32))
    taken = taken_from_trained(probe, gaussians, Enrolled(), Enrolled().with_drug(*near_last), "K-900002", 10.0)
    assert taken[:2].tolist() == [False, False]  # drug 3's crops lie at its own mean, nearer than the new drug's
    neighbours = Neighbours(gaussians, Enrolled(), ["K-0", "K-1", "K-2", "K-3"], skip="")
    nearest, _ = neighbours(centres[[3]])
    assert neighbours.codes[int(nearest[0])] == "K-3"
    # a file from before the classes were kept: a mean for every drug, in order
    np.savez(tmp_path / "old.npz", means=gaussians.means, whiten=gaussians.whiten)
    old = ClassGaussians.load(tmp_path / "old.npz")
    assert old.classes is None and old.knows_classes(3) and not old.knows_classes(4)
    assert gaussians.knows_classes(4) and again.knows_classes(4)
    # such a file, fit on 3 of 4 trained drugs, cannot say which drug each mean is: enrolment asks to recalibrate
    import types

    import pillsnap.infer.enrol as enrol_module
    from pillsnap.infer.enrol import _check_request

    predictor = types.SimpleNamespace(trained=(["K-0", "K-1", "K-2", "K-3"], {}), exp_dir=tmp_path, calibration={})
    enrol_module_trained = enrol_module.trained_gaussians
    try:
        enrol_module.trained_gaussians = lambda ckpt_dir, calibration: (old, 10.0)
        info, photos = DrugInfo.parse("K-900001", "new drug"), [tmp_path / f"{i}.png" for i in range(5)]
        with pytest.raises(EnrolmentError, match="do not say which drug each is .* recalibrate"):
            _check_request(predictor, info, photos)
        enrol_module.trained_gaussians = lambda ckpt_dir, calibration: (again, 10.0)
        assert _check_request(predictor, info, photos)[0] is again
    finally:
        enrol_module.trained_gaussians = enrol_module_trained


def test_messages_name_a_few_enrolled_codes_and_count_the_rest() -> None:
    """A log line, an error or a 404 body that named each of thousands of enrolled drugs ran to tens of kB."""
    from pillsnap.infer.enrolment import listed_codes

    codes = [f"K-9{i:05d}" for i in range(3000)]
    said = listed_codes(codes)
    assert said.startswith("K-900000, K-900001") and said.endswith("... (3,000 in all)") and len(said) < 150
    assert listed_codes(codes[:2]) == "K-900000, K-900001" and listed_codes([]) == "none"
