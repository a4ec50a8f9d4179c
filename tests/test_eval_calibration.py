"""Calibration at the end of training on the synthetic fixture, with two classes held out of the stage: the stored
temperature and thresholds, the class Gaussians, the reliability diagram, the held-out report, the unknown answer
for photos of the held-out classes, and refusal of stale calibration."""

from __future__ import annotations

import json

import pytest
from test_stage_eval import run_cfg

from pillsnap.cli import main as cli_main
from pillsnap.data import load_manifest
from pillsnap.eval.answer_calibration import EVIDENCE_SCALES
from pillsnap.eval.calibration import calibrate_classifier
from pillsnap.infer.artefacts import CALIBRATION_FILE, FEATURES_FILE, load_calibration
from pillsnap.infer.pipeline import Predictor
from pillsnap.infer.thresholds import WEIGHTS
from pillsnap.train import train
from pillsnap.utils.io import file_sha256

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _seed_holding_out_own_colours(keep: int, split_seed: int = 42) -> int:
    """The first generator seed whose drugs held out of a `keep`-class stage each have a colour no trained drug
    has. The session fixture's draw holds out look-alikes (a twin of a trained drug, and a white pill among white
    ones): no feature of their look tells them apart, so they cannot test the feature-distance rule."""
    from conftest import SYNTH_CLASSES

    from pillsnap.data.stages import stage_classes
    from pillsnap.data.synth import make_classes

    for seed in range(100):
        classes = make_classes(SYNTH_CLASSES, seed)
        kept = set(stage_classes([c.code for c in classes], keep, split_seed))
        known = {c.look.colors for c in classes if c.code in kept}
        if all(c.look.colors not in known for c in classes if c.code not in kept):
            return seed
    raise AssertionError("no seed holds out drugs of their own colours")


def test_calibration_with_held_out_classes(tmp_path):
    from conftest import SYNTH_CLASSES, SYNTH_COMBOS, SYNTH_PER_CLASS

    from pillsnap.data.scan import scan_dataset
    from pillsnap.data.synth import generate_dataset

    synth_root, manifest_dir = tmp_path / "data", tmp_path / "manifests"
    generate_dataset(synth_root, SYNTH_CLASSES, SYNTH_PER_CLASS, SYNTH_COMBOS, seed=_seed_holding_out_own_colours(4),
                     image_scale=0.125, workers=1, progress=False)
    scan_dataset(synth_root, manifest_dir, workers=1, progress=False)
    exp = tmp_path / "exp"
    # Single-pill crops only: the combination photos' varied backdrops, dishes and falloff put their crops far from
    # the class means (on the demo: median distance 1,396 against 254 for single-pill crops), which lifts the one
    # threshold over every held-out photo at this size; one threshold per crop source is still to come.
    cfg = run_cfg(synth_root, manifest_dir, exp, "train.strategy=classification", "train.epochs=6", "train.lr=3e-3",
                  "train.warmup_steps=2",
                  "train.max_steps_per_epoch=null", "data.progressive_validation.stage_1.max_classes=4",
                  "train.stage_evaluation=false", "data.combo_crops=false")
    assert train(cfg) == 0  # the run ends with the calibration
    stored = json.loads((exp / "checkpoints" / CALIBRATION_FILE).read_text(encoding="utf-8"))
    report = json.loads((exp / "reports" / "calibration.json").read_text(encoding="utf-8"))
    assert 0.05 <= stored["temperature"] <= 20 and stored["unknown_rule"] == "feature_distance"
    thresholds = stored["unknown_thresholds"]
    assert 0 <= thresholds["probability"] <= 1 and thresholds["feature_distance"] > 0
    assert "unknown_threshold" not in stored  # the one-threshold format of older runs is read, no longer written
    assert stored["features_file"].startswith("unknown_features-")  # named by its hash, not the fixed name of old
    assert not (exp / "checkpoints" / FEATURES_FILE).exists()
    assert file_sha256(exp / "checkpoints" / stored["features_file"]) == stored["features_sha256"]
    # only the files the calibration names are in the folder (no staged or stray ones)
    assert [p.name for p in (exp / "checkpoints").glob("unknown_features-*.npz")] == [stored["features_file"]]
    assert [p.name for p in (exp / "checkpoints").glob("validation_probe-*.npz")] == [stored["validation_probe_file"]]
    assert report["nll_after"] <= report["nll_before"] + 1e-9  # fit on these very photos: never worse
    assert (exp / "reports" / "reliability.png").stat().st_size > 0
    answers = report["answers"]  # the final answers, after the imprint evidence, on every validation crop
    assert answers["n"] == report["n_val"] and 0 <= answers["accuracy"] <= 1 and 0 <= answers["ece"] <= 1
    # one threshold per crop source: this run's crops are all single-pill photos (combo crops off), so the single
    # threshold is the one over all crops and the combination source, with no answers, falls back to it
    by_source = stored["unknown_thresholds_by_source"]
    assert by_source["single"] == thresholds and by_source["combination"] == thresholds
    assert report["unknown_eval"]["known_crops"] == "single"
    assert report["unknown_eval_all_crops"]["known_crops"] == "all"
    sets = stored["prediction_sets"]  # the conformal scores of the named validation answers, both methods
    assert set(sets["scores"]) == {"aps", "lac"} and sets["n"] + sets["withheld_unknown"] == answers["n"]
    assert all(len(v) == sets["n"] for v in sets["scores"].values()) and sets["imprint_reading"] is True
    assert report["prediction_sets"]["method"] == "lac" and report["prediction_sets"]["coverage"] == 0.95
    assert stored["evidence_scale"] in EVIDENCE_SCALES or stored["evidence_scale"] == 1.0  # 1.0: nothing was read
    assert (stored["likelihood_weight"], stored["likelihood_cap"]) == (WEIGHTS.likelihood, WEIGHTS.likelihood_cap)
    assert answers["evidence_scale"] == stored["evidence_scale"] and answers["unscaled"]["n"] == answers["n"]
    unknown = report["unknown_eval"]
    assert unknown["held_out_classes"] == 2 and unknown["unknown"] > 0 and 0.0 <= unknown["auroc"] <= 1.0
    assert report["unknown_eval_by_rule"]["feature_distance"] == unknown
    assert set(report["unknown_eval_by_rule"]) == {"feature_distance", "probability"}
    assert load_calibration(exp / "checkpoints", exp / "checkpoints" / "classification_best.pt") == stored
    # fit on the validation photos cut as inference cuts them (each single-pill photo where its pill is located),
    # not at the labelled boxes the validation of training uses
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.eval.outputs import eval_loader, inference_crops, model_outputs
    from pillsnap.eval.unknown_calibration import crop_sources
    from pillsnap.metrics.calibration import fit_temperature
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference

    val_set = build_dataloaders_twostage(cfg).cls_val.dataset
    model = WithFeatures(load_classifier_for_inference(exp / "checkpoints" / "classification_best.pt", "cpu")[0])
    cut = {name: model_outputs(model.eval(), eval_loader(crops, cfg), "cpu") for name, crops in (
        ("inference", inference_crops(val_set, crop_sources(val_set, load_manifest(manifest_dir)), cfg)),
        ("labelled", val_set))}
    temperatures = {name: fit_temperature(out[1], out[0]) for name, out in cut.items()}
    assert stored["temperature"] == pytest.approx(temperatures["inference"], rel=1e-6)
    assert stored["temperature"] != pytest.approx(temperatures["labelled"], rel=1e-3)
    # the validation crops an enrolment's cost to the trained drugs is measured on, named by hash
    from pillsnap.infer.enrolment import Probe, load_probe

    probe, why = load_probe(exp / "checkpoints", stored)
    assert why is None and len(probe.labels) == report["validation_probe_crops"] == report["n_val"]
    assert ((probe.top > 0) & (probe.top <= 1)).all() and set(probe.labels.tolist()) <= set(range(4))
    import numpy as np

    from pillsnap.metrics.novelty import ClassGaussians

    whiten = ClassGaussians.load(exp / "checkpoints" / stored["features_file"]).whiten  # the probe: those same crops
    # stored in float16: a hundredth on features of ~10
    assert np.abs(probe.whitened - cut["inference"][2] @ whiten).max() < 0.05
    assert np.abs(probe.whitened - cut["labelled"][2] @ whiten).max() > 0.5
    probe_path = exp / "checkpoints" / stored["validation_probe_file"]
    saved = probe_path.read_bytes()
    Probe(probe.whitened[:2], probe.labels[:2], probe.top[:2], probe.right[:2]).save(probe_path)
    assert load_probe(exp / "checkpoints", stored)[0] is None  # not the file the calibration names: not used
    probe_path.write_bytes(saved)
    # The final answers on the same held-out photos with the imprint check (inference.imprint.unknown_check) and as
    # inference answers without it; the sets are bound to the check being on
    final, plain = report["unknown_eval_answers"], report["unknown_eval_answers"]["without_imprint_check"]
    assert final["unknown"] == unknown["unknown"] and final["known"] == plain["known"] > 0
    assert 0.0 <= final["auroc"] <= 1.0 and 0.0 <= final["unknown_rejected_by_imprint"] <= final["unknown_rejected"]
    assert stored["prediction_sets"]["imprint_check"] is True

    # Through the predictor: photos of the held-out classes are answered "unknown" as often as the calibration
    # measured its final answers (rule and imprint check) on them: the predictor applies the calibrated rule, and
    # that rule tells them from known crops. (This test once asked for 0.3 more unknown answers on held-out than on
    # known photos: on this toy run of 18 steps, that held for about half of the training orders, across
    # train.seed and sampler seeds. The known photos' rate is not asserted: 4 photos here.)
    # fewer than 19 named answers certify no 95 % set (this toy run names a handful); one certifies a 50 % set
    assert (Predictor(exp, cfg, device="cpu").set_rule is None) == (sets["n"] < 19) and sets["n"] >= 1
    half = cfg.copy()
    half.inference.prediction_set.coverage = 0.5
    predictor = Predictor(exp, half, device="cpu")
    manifest = load_manifest(manifest_dir)
    singles = manifest[manifest["image_type"] == "single"]
    held_out = singles[~singles["mapping_code"].isin(predictor.class_names)]["image_path"].unique()[:12]
    known = singles[singles["mapping_code"].isin(predictor.class_names) & (singles["split"] == "val")]
    rate = {name: sum(p["unknown"] for path in paths for p in predictor.predict(path, mode="single")["pills"])
            / len(paths) for name, paths in (("held_out", held_out), ("known", known["image_path"].unique()[:12]))}
    # No floor on the held-out AUROC here: against 4 known validation crops it moves in steps of 1/48, and it
    # went from >= 0.7 to 0.5 with a new environment's package versions and the same code (two known crops of
    # another side and light lie farther out than every held-out crop). The demo measures it on 76 known and 120
    # held-out photos; here the calibrated rule is checked to be the one the predictor applies.
    assert unknown["known"] == 4 and unknown["unknown"] == 12  # every held-out photo scored against them
    assert rate["held_out"] > 0 and abs(rate["held_out"] - final["unknown_rejected"]) <= 0.1, (rate, final)
    pills = [p for path in held_out for p in predictor.predict(path, mode="single")["pills"]]
    assert predictor.set_rule is not None and predictor.set_rule.method == "lac"
    for pill in pills:  # an unknown pill names no drug: no probability, an empty set; a named one has its set
        if pill["unknown"]:
            assert pill["probability"] is None and pill["prediction_set"] == [] and pill["sure"] is False
        else:
            assert pill["prediction_set"][0]["mapping_code"] == pill["mapping_code"]
            assert pill["sure"] == (len(pill["prediction_set"]) == 1)

    (exp / "checkpoints" / CALIBRATION_FILE).unlink()  # `pillsnap calibrate` fits it again from the run's config
    assert cli_main(["calibrate", "--exp", str(exp), "--device", "cpu"]) == 0
    assert json.loads((exp / "checkpoints" / CALIBRATION_FILE).read_text(encoding="utf-8")) == stored
    assert cli_main(["calibrate", "--exp", str(tmp_path / "nothing")]) == 2
    assert cli_main(["calibrate", "--exp", str(exp), "inference.unknown_rule=entropy"]) == 2  # one line, no traceback

    again = calibrate_classifier(cfg, exp, keep_correct=0.0)  # 0 turns the unknown answer off
    assert again["unknown_thresholds"] == {"probability": None, "feature_distance": None}
    assert again["unknown_eval"]["unknown_rejected"] == 0.0
    (exp / "checkpoints" / "classification_best.pt").write_bytes(b"other weights")
    assert load_calibration(exp / "checkpoints", exp / "checkpoints" / "classification_best.pt") is None


def test_held_out_sample_is_bounded_and_spread_over_classes(synth_cfg, monkeypatch):
    """The unknown-pill rules are measured on a bounded sample of held-out crops, every held-out class in it: at
    Stage 1 of the real data the classes outside the stage have ~490,000 single-pill photos."""
    from pillsnap.eval import unknown_calibration as calibration

    rows = load_manifest(synth_cfg.paths.manifest_dir)
    singles = rows[rows["image_type"] == "single"]
    known = set(sorted(singles["mapping_code"].unique())[:2])
    held_out = singles[~singles["mapping_code"].isin(known)]
    monkeypatch.setattr(calibration, "HELD_OUT_CROPS", held_out["mapping_code"].nunique() * 2)
    loader = calibration.held_out_loader(synth_cfg, known, rows)
    codes = [r.mapping_code for r in loader.dataset.rows]
    assert len(codes) == calibration.HELD_OUT_CROPS < len(held_out)
    assert set(codes) == set(held_out["mapping_code"]) and not set(codes) & known
    assert all(codes.count(code) == 2 for code in set(codes))


def test_outputs_fill_arrays_of_the_data_sets_size_and_trim_what_failed_to_decode():
    """Calibration's passes fill arrays as the batches come (no second copy by concatenation at Stage 4 sizes); a
    batch whose photos all failed to decode (None) leaves the arrays trimmed to the rows that came."""
    import numpy as np
    import torch

    from pillsnap.eval.outputs import model_outputs as _outputs

    def model(x):
        return x[:, :3] * 2.0, x[:, 3:]

    batches = [(torch.arange(i, i + 15, dtype=torch.float32).reshape(3, 5), torch.tensor([0, 1, 2]))
               for i in (0, 15)] + [None, (torch.ones(2, 5), torch.tensor([1, 1]))]
    loader = type("Loader", (), {"dataset": list(range(10)), "__iter__": lambda self: iter(batches)})()
    labels, log_p, feats, rows = _outputs(model, loader, "cpu")
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 1, 1] and log_p.shape == (8, 3) and feats.shape == (8, 2)
    assert rows is None  # these batches do not say which crop each row is (InferenceCrops' do)
    want = torch.log_softmax(torch.cat([b[0][:, :3] * 2.0 for b in batches if b is not None]), -1).numpy()
    assert np.allclose(log_p, want) and np.allclose(np.exp(log_p).sum(1), 1.0, atol=1e-5)
    assert feats[-1].tolist() == [1.0, 1.0]
    labels, log_p, feats, _ = _outputs(model, loader, "cpu", keep_log_probs=False)
    assert log_p.shape == (8, 0) and feats.shape == (8, 2)
    empty = type("Loader", (), {"dataset": [], "__iter__": lambda self: iter([])})()
    assert [a.shape for a in _outputs(model, empty, "cpu")[:3]] == [(0,), (0, 0), (0, 0)]


def _two_crops_of(photo):
    """A crop data set of two rows of `photo` (labels 3 and 5) whose own crop is a 7x7 black square (returned too):
    what InferenceCrops cuts anew is told from what it takes from the data set."""
    import numpy as np
    from PIL import Image

    boxed = Image.new("RGB", (7, 7), (0, 0, 0))

    class Rows:
        def __getitem__(self, index):
            return type("Row", (), {"image_path": str(photo)})()

    dataset = type("Set", (), {"rows": Rows(), "crop_margin": 0.15, "labels": np.array([3, 5]),
                               "transform": staticmethod(lambda crop: crop),
                               "load_crop": lambda self, index: boxed})()
    return dataset, boxed


def test_the_probe_cuts_crops_as_inference_does(tmp_path):
    """The enrolment probe's single-pill photos are cut as the single path cuts them (the pill located on its
    backdrop, else a centred square), not at the labelled box the classifier's data set uses; a combination
    photo's pill is cut at its box (the detector's box stands in for it)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pillsnap.eval.outputs import InferenceCrops
    from pillsnap.infer.preprocess import load_image, single_photo_crop

    photo = tmp_path / "single.png"
    image = Image.new("RGB", (120, 160), (190, 190, 185))
    ImageDraw.Draw(image).ellipse((30, 50, 80, 90), fill=(200, 40, 120))
    image.save(photo)
    dataset, boxed = _two_crops_of(photo)
    crops = InferenceCrops(dataset, np.array([True, False]), locate=True, fraction=0.35)
    cut, label, _ = crops[0]
    want = single_photo_crop(load_image(str(photo))[0], 0.15, True, 0.35)[0]  # the predictor's own decode
    assert label == 3 and cut.size == want.size and np.array_equal(np.asarray(cut), np.asarray(want))
    assert cut.size != (120, 160) and cut.size != (7, 7)  # located: neither the whole photo nor the box crop
    assert crops[1][0] is boxed and crops[1][1] == 5
    # a photo whose EXIF says "turn me" is cut upright, as the predictor decodes it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    image.save(photo, format="PNG", exif=exif)
    cut = InferenceCrops(dataset, np.array([True, False]), locate=True, fraction=0.35)[0][0]
    want = single_photo_crop(load_image(str(photo))[0], 0.15, True, 0.35)[0]
    stored = single_photo_crop(Image.open(photo).convert("RGB"), 0.15, True, 0.35)[0]  # not turned
    assert np.array_equal(np.asarray(cut), np.asarray(want)) and not np.array_equal(np.asarray(cut),
                                                                                    np.asarray(stored))


def test_a_combination_pill_is_cut_at_the_detector_box_it_was_matched_to(tmp_path, monkeypatch):
    """InferenceCrops cuts a combination photo's pill at the detector's box given for its row, from the photo at
    full resolution in the frame its labels are in (the box was found there), as the combo path cuts it; a pill with
    no detector box is the data set's own crop."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pillsnap.eval.outputs import InferenceCrops
    from pillsnap.infer.preprocess import crop_pill

    photo = tmp_path / "combo.png"
    image = Image.new("RGB", (200, 160), (190, 190, 185))
    ImageDraw.Draw(image).ellipse((30, 50, 80, 90), fill=(200, 40, 120))
    ImageDraw.Draw(image).rectangle((120, 30, 170, 60), fill=(40, 120, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # a turn the predictor would apply to a photo of a person; labelled data keeps its frame
    image.save(photo, format="PNG", exif=exif)
    dataset, boxed = _two_crops_of(photo)
    box = np.array([118.0, 27.0, 55.0, 36.0])
    crops = InferenceCrops(dataset, np.array([False, False]), locate=True, fraction=0.35, detected={1: box})
    assert crops[0][0] is boxed and crops[0][1] == 3  # no detector box: the data set's crop
    cut, label, _ = crops[1]
    want = crop_pill(image, box, 0.15)
    assert label == 5 and np.array_equal(np.asarray(cut), np.asarray(want))
    # a photo's pills come one after the other: it is decoded once for them
    import pillsnap.utils.images

    decoded = []
    read_image = pillsnap.utils.images.read_image
    monkeypatch.setattr(pillsnap.utils.images, "read_image", lambda *a, **k: (decoded.append(a[0]),
                                                                            read_image(*a, **k))[1])
    other = np.array([28.0, 48.0, 55.0, 45.0])
    both = InferenceCrops(dataset, np.array([False, False]), locate=True, fraction=0.35, detected={0: other, 1: box})
    assert np.array_equal(np.asarray(both[0][0]), np.asarray(crop_pill(image, other, 0.15)))
    assert np.array_equal(np.asarray(both[1][0]), np.asarray(want)) and decoded == [str(photo)]


def test_a_calibration_killed_before_its_json_leaves_the_old_pair_whole(tmp_path, monkeypatch):
    """The class Gaussians are written under a name of their own hash before calibration.json names them: a kill in
    between leaves the old calibration naming its own file, whole, so the unknown-pill rule stays on (before, the
    new file overwrote the old one's fixed name, and the rule went off until a new calibration)."""
    import numpy as np

    from pillsnap.eval import calibration
    from pillsnap.infer.artefacts import load_class_gaussians
    from pillsnap.metrics.novelty import ClassGaussians
    from pillsnap.utils import save_json

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    rng = np.random.default_rng(0)
    old = ClassGaussians.fit(rng.normal(size=(40, 6)), np.arange(40) % 4)
    old.save(ckpts / FEATURES_FILE)  # as an older PillSnap wrote it, under the fixed name
    stored = {"features_file": FEATURES_FILE, "features_sha256": file_sha256(ckpts / FEATURES_FILE)}
    save_json(ckpts / CALIBRATION_FILE, stored)

    def killed(path, obj, **kwargs):
        if str(path).endswith(CALIBRATION_FILE):
            raise KeyboardInterrupt("killed")
        return save_json(path, obj, **kwargs)

    monkeypatch.setattr(calibration, "save_json", killed)
    new = ClassGaussians.fit(rng.normal(size=(40, 6)) + 5, np.arange(40) % 4)
    with pytest.raises(KeyboardInterrupt):
        calibration._write(tmp_path, {}, {}, new, None)
    still = json.loads((ckpts / CALIBRATION_FILE).read_text(encoding="utf-8"))
    gaussians, _, problem = load_class_gaussians(ckpts, still)
    assert problem is None and np.array_equal(gaussians.means, old.means)
    assert [p.name for p in ckpts.glob("unknown_features-*.npz")] != []  # the new one waits, named by its hash
    # a reader whose file a committing calibration removes between its checks says "missing", never raises
    def removed(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(ClassGaussians, "load", removed)
    assert load_class_gaussians(ckpts, still)[2] == "missing"


def test_the_probe_takes_calibrations_answers_or_reads_its_crops_again_when_some_failed(monkeypatch):
    """Calibration keeps each crop's answer and top probability, not the [N, C] probabilities (2.8 GB at 5,000
    classes): the probe takes its rows of them, or, where photos failed to decode and the outputs no longer line
    up with the crops, its crops' fresh outputs at the overall temperature."""
    import numpy as np
    from omegaconf import OmegaConf

    from pillsnap.eval import probe as probe_module
    from pillsnap.eval.calibration import Validation
    from pillsnap.eval.outputs import InferenceCrops
    from pillsnap.infer.artefacts import Temperatures

    class Data:
        labels = np.repeat(np.arange(3), 4)
        transform = None

    crops = InferenceCrops(Data(), np.ones(12, bool), locate=False, fraction=1.0)
    gaussians = type("G", (), {"whiten": np.eye(2, dtype=np.float32)})()
    cfg = OmegaConf.create({"train": {"seed": 0}, "dataloader": {"num_workers": 0}})
    top = np.linspace(0.3, 0.9, 12)
    answers = np.where(np.arange(12) % 3 == 0, 2, Data.labels)
    val = Validation(Data.labels, np.arange(24, dtype=np.float32).reshape(12, 2), Temperatures(2.0), top, answers,
                     None)
    probe = probe_module.build_probe(None, crops, val, gaussians, cfg, "cpu")
    assert np.allclose(probe.top, top) and np.array_equal(probe.right, answers == Data.labels)

    log_p = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    monkeypatch.setattr(probe_module, "model_outputs",
                        lambda *a, **k: (np.array([0, 1]), log_p, np.zeros((2, 2), np.float32), None))
    monkeypatch.setattr(probe_module, "eval_loader", lambda dataset, cfg: dataset)
    short = val._replace(labels=val.labels[:11])  # a photo failed: 11 outputs for 12 crops
    probe = probe_module.build_probe(None, crops, short, gaussians, cfg, "cpu")
    expected = np.exp(log_p / 2.0) / np.exp(log_p / 2.0).sum(axis=1, keepdims=True)
    assert np.allclose(probe.top, expected.max(axis=1), atol=1e-6) and probe.right.tolist() == [True, False]
