"""One temperature per crop source: calibration fits it on each source's validation crops where it has enough of
them, and inference applies to a crop the temperature of the path that cut it (single photo or detector box)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_infer_pipeline import _calibration, _cfg, make_exp_dir

from pillsnap.eval.calibration import MIN_SOURCE_CROPS, MIN_SOURCE_WRONG, fit_temperatures
from pillsnap.infer.artefacts import Temperatures
from pillsnap.infer.pipeline import Predictor
from pillsnap.metrics.calibration import calibrated_probs, fit_temperature, nll
from pillsnap.utils import save_json


def _crops(n: int, right: float, sharpness: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities over 4 classes whose top class is the label on `right` of the rows, each `sharpness` sure."""
    labels = rng.integers(0, 4, n)
    top = np.where(rng.random(n) < right, labels, (labels + 1) % 4)
    logits = rng.normal(0, 0.3, (n, 4))
    logits[np.arange(n), top] += sharpness
    return logits, labels


def test_each_source_gets_the_temperature_its_own_crops_call_for():
    rng = np.random.default_rng(0)
    single = _crops(200, right=0.95, sharpness=2.0, rng=rng)  # right nearly always, but not that sure: T < 1
    combination = _crops(200, right=0.6, sharpness=4.0, rng=rng)  # wrong often, and sure anyway: T > 1
    log_p = np.concatenate([single[0], combination[0]])
    labels = np.concatenate([single[1], combination[1]])
    sources = np.array(["single"] * 200 + ["combination"] * 200)
    fitted = fit_temperatures(log_p, labels, sources)
    assert fitted.overall == pytest.approx(fit_temperature(log_p, labels))
    assert fitted.by_source["single"] == pytest.approx(fit_temperature(*single))
    assert fitted.by_source["combination"] == pytest.approx(fit_temperature(*combination))
    assert fitted.by_source["single"] < 1.0 < fitted.by_source["combination"]
    # each crop at its source's temperature: a lower NLL than one temperature for all
    per_row = fitted.per_row(sources)
    assert nll(log_p, labels, per_row) < nll(log_p, labels, fitted.overall)
    probs = calibrated_probs(log_p, per_row)
    assert np.allclose(probs[:200], calibrated_probs(single[0], fitted.by_source["single"]))
    assert np.allclose(probs[200:], calibrated_probs(combination[0], fitted.by_source["combination"]))
    # a source with too few crops takes the overall temperature; sources unknown or misaligned (photos that failed
    # to decode): the overall one alone
    few = np.array(["single"] * (400 - MIN_SOURCE_CROPS + 1) + ["combination"] * (MIN_SOURCE_CROPS - 1))
    assert fit_temperatures(log_p, labels, few).by_source["combination"] == fitted.overall
    # a source nearly always right: its own fit would run to the temperature's lower bound (every answer 1.0)
    sure = _crops(200, right=1.0, sharpness=4.0, rng=rng)
    sure[0][:MIN_SOURCE_WRONG - 1, sure[1][:MIN_SOURCE_WRONG - 1]] -= 10.0  # a few wrong
    mixed = (np.concatenate([sure[0], combination[0]]), np.concatenate([sure[1], combination[1]]))
    assert (mixed[0][:200].argmax(1) != mixed[1][:200]).sum() == MIN_SOURCE_WRONG - 1
    fewer_wrong = fit_temperatures(*mixed, sources).by_source
    assert fewer_wrong["single"] == fit_temperature(*mixed) and fewer_wrong["combination"] != fewer_wrong["single"]
    assert fit_temperatures(log_p, labels, None) == Temperatures(fitted.overall)
    assert fit_temperatures(log_p, labels, sources[:-1]) == Temperatures(fitted.overall)


def test_a_stored_calibration_gives_each_crop_its_source_temperature():
    both = Temperatures.from_stored({"temperature": 2.0, "temperature_by_source": {"single": 0.5,
                                                                                   "combination": 3.0}})
    assert (both.of("single"), both.of("combination"), both.of(None)) == (0.5, 3.0, 2.0)
    assert both.per_row(["combination", "single", None]).tolist() == [3.0, 0.5, 2.0]
    older = Temperatures.from_stored({"temperature": 2.0})  # written before per-source temperatures
    assert (older.of("single"), older.of("combination")) == (2.0, 2.0)
    assert Temperatures.from_stored(None).of("single") == 1.0  # uncalibrated
    partial = Temperatures.from_stored({"temperature": 2.0, "temperature_by_source": {"single": None}})
    assert partial.of("single") == 2.0
    for broken, said in (({"temperature": 0.0}, "temperature must be a positive number"),
                         ({"temperature": 1.0, "temperature_by_source": {"single": "hot"}},
                          "temperature_by_source.single must be a positive number"),
                         ({"temperature": 1.0, "temperature_by_source": [0.5]}, "must map crop sources")):
        with pytest.raises(ValueError, match=said):
            Temperatures.from_stored(broken)


def test_the_predictor_calibrates_a_crop_at_the_temperature_of_the_path_that_cut_it(tmp_path: Path):
    root = make_exp_dir(tmp_path / "exp", with_detector=False)
    ckpts = root / "checkpoints"
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "temperature": 1.0,
                                           "temperature_by_source": {"single": 0.5, "combination": 4.0}})
    predictor = Predictor(root, _cfg(root), device="cpu")
    crop = Image.new("RGB", (64, 64), (200, 40, 120))
    logits = predictor.forward([crop])[0].float()

    def top(temperature: float) -> float:
        return float(torch.softmax(logits / temperature, -1).max())

    for source, temperature in (("single", 0.5), ("combination", 4.0), (None, 1.0)):
        got = predictor.classify([crop], source)[0].topk[0]["probability"]
        assert got == pytest.approx(top(temperature), rel=1e-5), source
    mixed = predictor.classify([crop, crop], ["combination", "single"])
    assert [c.topk[0]["probability"] for c in mixed] == pytest.approx([top(4.0), top(0.5)], rel=1e-5)
    with pytest.raises(ValueError, match="1 crop sources for 2 crops"):
        predictor.classify([crop, crop], ["single"])


def test_each_path_of_the_pipeline_names_its_crops_source(tmp_path: Path, monkeypatch):
    """The single path classifies its whole-photo crop as "single"; the combo path its detector crops, and the
    check of one detected pill against the whole photo, as "combination"."""
    import numpy as np
    from test_infer_pipeline import pill_photo

    import pillsnap.infer.pipeline
    from pillsnap.infer.thresholds import WEIGHTS

    root = make_exp_dir(tmp_path / "exp")
    ckpts = root / "checkpoints"
    save_json(ckpts / "calibration.json", {**_calibration(ckpts), "evidence_scale": 1.0,
                                           "evidence_scale_by_source": {"single": 0.25, "combination": 2.0}})
    predictor = Predictor(root, _cfg(root, "inference.single_locate=false"), device="cpu")
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    weighed: list[float] = []  # each answer's read weighed by its path's evidence scale
    decide = pillsnap.infer.pipeline.decide_answer
    monkeypatch.setattr(pillsnap.infer.pipeline, "decide_answer",
                        lambda *args, **kwargs: (weighed.append(args[6].imprint), decide(*args, **kwargs))[1])
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: np.array(
        [[10, 10, 30, 24, 0.9], [70, 100, 30, 24, 0.8]], float))
    seen: list = []
    classify = predictor.classify
    monkeypatch.setattr(predictor, "classify", lambda crops, source=None: (seen.append((len(crops), source)),
                                                                         classify(crops, source))[1])
    predictor.predict(str(photo), mode="single")
    assert seen == [(1, "single")] and weighed == [pytest.approx(WEIGHTS.imprint * 0.25)]
    seen.clear()
    weighed.clear()
    predictor.predict(str(photo), mode="combo")
    assert (2, "combination") in seen and all(source in ("single", "combination") for _, source in seen)
    assert weighed == [pytest.approx(WEIGHTS.imprint * 2.0)] * 2
    one = np.array([[10, 10, 30, 24, 0.9]], float)  # one pill found, on a photo not located: checked as a crop
    monkeypatch.setattr(predictor, "detect", lambda image, conf, forward=None, max_det=300: one)
    seen.clear()
    predictor.predict(str(photo), mode="auto")
    assert seen[0] == (1, "single") and (1, "combination") in seen[1:]


def test_a_crop_that_fails_to_decode_leaves_the_per_source_calibration_in_place(caplog):
    """One unreadable validation photo among thousands used to misalign the crops' sources with the outputs, and
    calibration fell back to one temperature and one unknown-pill threshold for both sources. The outputs say which
    crop each row is (InferenceCrops numbers them), so the sources follow the rows that are left."""
    from torch.utils.data import DataLoader, Dataset

    from pillsnap.data.datasets import safe_collate
    from pillsnap.eval.calibration import _temperature
    from pillsnap.eval.outputs import model_outputs

    rng = np.random.default_rng(0)
    single, combination = _crops(120, 0.9, 2.0, rng), _crops(120, 0.6, 4.0, rng)
    logits = np.concatenate([single[0], combination[0]]).astype(np.float32)
    labels = np.concatenate([single[1], combination[1]])
    sources = np.array(["single"] * 120 + ["combination"] * 120)
    broken = {7, 130, 131}

    class Numbered(Dataset):  # as InferenceCrops gives its crops: the row in the meta, None where it fails
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return None if i in broken else (torch.tensor([float(i)]), int(labels[i]), {"row": i})

    class Outputs(torch.nn.Module):  # the crop's own log-probabilities and a feature, as WithFeatures gives them
        def forward(self, x: torch.Tensor):
            rows = x[:, 0].long()
            return torch.from_numpy(logits)[rows], x

    loader = DataLoader(Numbered(), batch_size=16, collate_fn=safe_collate)
    out = model_outputs(Outputs(), loader, "cpu")
    kept = np.array([i for i in range(len(labels)) if i not in broken])
    assert list(out.rows) == list(kept) and list(out.labels) == list(labels[kept])
    val, _ = _temperature(Outputs(), loader, "cpu", sources)
    assert list(val.sources) == list(sources[kept]) and len(val.sources) == len(val.labels)
    assert val.temperatures.by_source is not None  # both sources keep their own temperature
    assert val.temperatures.by_source == fit_temperatures(out.log_probs, out.labels, sources[kept]).by_source
    assert "3 of 240 validation crops could not be decoded" in caplog.text


def test_a_classifier_with_non_finite_outputs_is_refused_not_calibrated_into_no_unknown_rule():
    """One NaN feature row made the class Gaussians all NaN, every distance NaN and the stored threshold null: the
    unknown-pill rule was off at inference with nothing said. Broken weights now stop the calibration by name."""
    from torch.utils.data import DataLoader, TensorDataset

    from pillsnap.eval.outputs import model_outputs

    x = torch.randn(20, 4)
    x[5, 2] = float("nan")

    class Outputs(torch.nn.Module):
        def forward(self, batch: torch.Tensor):
            return batch, batch

    loader = DataLoader(TensorDataset(x, torch.zeros(20, dtype=torch.int64)), batch_size=8)
    with pytest.raises(ValueError, match=r"non-finite outputs \(NaN or infinity\) for 1 of 20 crops"):
        model_outputs(Outputs(), loader, "cpu")
    x[5, 2] = 0.0
    assert model_outputs(Outputs(), loader, "cpu").features.shape == (20, 4)
