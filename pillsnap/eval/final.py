"""Final test evaluation of the checkpoints: the one place training loads the test split (the demo's end-to-end
figures, pillsnap.eval.pipeline_report, read its photos too, after training is over).

Runs once after the last stage: best checkpoints on the test loaders, val-vs-test gap (overfitting check), the
business goals (pillsnap.eval.criteria.BUSINESS_GOALS), a recommendation, and
{exp_dir}/reports/final_test_results.json. Each model's figures are kept in reports/final_test_parts.json as soon as
they are measured: at Stage 4 the classifier's passes over the test split take tens of minutes, and a try that
fails in the detector's part (or is interrupted) does not measure them again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pillsnap.eval.after_training import mark_done
from pillsnap.eval.criteria import BUSINESS_GOALS
from pillsnap.eval.stage_measure import best_checkpoint_metrics
from pillsnap.metrics.names import final_test_name
from pillsnap.utils import read_json, resolve_device, save_json
from pillsnap.utils.run_status import COMPLETED_STATUSES

LOGGER = logging.getLogger(__name__)
PARTS_FILE = "final_test_parts.json"


def _test_classification(ckpt: Path, loader: Any, device: Any, cfg: DictConfig) -> tuple[dict, dict | None]:
    """The classifier on the test crops cut at their labelled boxes (as validation measures it: the val-minus-test
    gap compares like with like), and on the single-pill test photos cut as inference cuts them (where the pill is
    located on its backdrop: the figure the single-pill goal is about; None when the split cannot say which
    photos are single-pill ones)."""
    import numpy as np

    from pillsnap.engine.classification import validate_classification
    from pillsnap.engine.optim import build_criterion_classification
    from pillsnap.eval.calibration import load_manifest_if_any
    from pillsnap.eval.outputs import InferenceCrops, eval_loader
    from pillsnap.eval.unknown_calibration import crop_sources
    from pillsnap.models.classifier import load_classifier_for_inference

    model, _ = load_classifier_for_inference(ckpt, device=str(device))
    # The validation criterion (label smoothing), so the val-minus-test loss gap compares like with like.
    criterion = build_criterion_classification(cfg)
    at_boxes = validate_classification(model, loader, criterion, device)
    dataset = loader.dataset
    sources = crop_sources(dataset, load_manifest_if_any(cfg)) if hasattr(dataset, "load_crop") else None
    if sources is None or not (sources == "single").any():
        return at_boxes, None
    single = sources == "single"
    crops = InferenceCrops(dataset, single, bool(cfg.inference.single_locate), float(cfg.inference.single_crop),
                           positions=np.flatnonzero(single))
    return at_boxes, validate_classification(model, eval_loader(crops, cfg), criterion, device)


def _test_detection(ckpt: Path, loader: Any, device: Any, cfg: DictConfig) -> dict:
    from pillsnap.engine.detection import validate_detection
    from pillsnap.models.detector import load_detector_for_inference

    model, _ = load_detector_for_inference(ckpt, device=str(device))
    det = cfg.train.detection
    return validate_detection(model, loader, device, float(det.conf_threshold), float(det.iou_threshold))


GOAL_MEASURED_ON = {"classification": "single-pill test photos, cut as inference cuts them",
                    "classification_at_boxes": "every test crop, cut at its labelled box (the split cannot say "
                                               "which photos are single-pill ones)",
                    "detection": "the test photos"}


def _goals(test: dict, single: dict | None) -> dict:
    """The design's goals: single-pill macro-F1 (on the single-pill photos as inference crops them, where the split
    says which they are) and the combination photos' mAP@0.5."""
    goals = {}
    for path, target in BUSINESS_GOALS.items():
        section, metric = path.split(".", 1)
        block = single if section == "classification" and single is not None else test.get(section, {})
        value = block.get(metric)
        where = section if section != "classification" or single is not None else "classification_at_boxes"
        goals[path] = {"target": target, "value": value, "met": value is not None and value >= target,
                       "measured_on": GOAL_MEASURED_ON[where]}
    goals["overall_target_met"] = all(g["met"] for g in goals.values())
    return goals


def final_test_owed(exp_dir: str | Path, stage: int) -> str | None:
    """None when the run may have its final test evaluation: a Stage 4 run with a classifier that trained all it
    meant to (completed or early stopped; not stopped by its time cap, whose minimums were not met, nor cut short);
    else why not. `stage`: the config's; the stage its metrics.json records counts too (a --cfg of another stage
    does not make a Stage 2 run a Stage 4 one). Training, its hints and `pillsnap evaluate --final` ask the same."""
    exp = Path(exp_dir)
    try:
        metrics = json.loads((exp / "reports" / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    status, recorded = metrics.get("status"), (metrics.get("stage") or {}).get("current_stage", stage)
    if stage != 4 or recorded != 4:
        return f"it is a Stage {recorded if recorded != 4 else stage} run: the test split is opened once, after Stage 4"
    if not (exp / "checkpoints" / "classification_best.pt").is_file():
        return "it has no classifier (classification_best.pt) to test"
    if status not in COMPLETED_STATUSES:
        return (f"its training did not finish (status {status}): the test split follows a Stage 4 run that trained "
                "all it meant to, not one stopped by its time cap or cut short")
    return None


def final_test_written(exp_dir: str | Path) -> bool:
    """Whether the run's final test results are of its training as it last ended: they name the metrics.json they
    followed by its SHA-256 (file times do not survive every copy); results without it, by the files' times."""
    from pillsnap.utils.io import file_sha256

    reports = Path(exp_dir) / "reports"
    results, metrics = reports / "final_test_results.json", reports / "metrics.json"
    if not (results.is_file() and metrics.is_file()):
        return False
    try:
        named = json.loads(results.read_text(encoding="utf-8")).get("metrics_sha256")
    except (OSError, ValueError):
        return False
    if named is None:
        return results.stat().st_mtime >= metrics.stat().st_mtime
    return named == file_sha256(metrics)


def final_test_missing(exp_dir: str | Path, stage: int) -> bool:
    """Whether the run owes its final test (final_test_owed) and its results are not written yet."""
    return final_test_owed(exp_dir, stage) is None and not final_test_written(exp_dir)


# What each model's test figures depend on besides its weights and the training they follow (the data's files are
# named by their SHA-256): the settings each part reads. Not the classifier's batch size, nor the detector's in the
# classifier's part: a retry with a smaller detector batch after an OOM keeps the classifier's figures (the
# detector's batches pad their photos together, so its own batch size is in its part).
PART_SETTINGS = {
    "classification": ("data", "model.backbone", "model.image_size", "loss", "inference.single_locate",
                       "inference.single_crop"),
    "detection": ("data", "model.detector", "model.det_image_size", "train.detection.conf_threshold",
                  "train.detection.iou_threshold", "train.detection.batch_size"),
}


class TestParts:
    """The final test's figures of each model measured so far (reports/final_test_parts.json), for the training
    whose metrics.json hashes to `metrics_sha256`. Each part is kept with the SHA-256 of its weights and a digest of
    what else it depends on (PART_SETTINGS, the manifest's files). A change to the code between tries is not seen:
    delete the file to measure both again."""

    def __init__(self, exp_dir: Path, cfg: DictConfig) -> None:
        from pillsnap.utils.io import file_sha256

        metrics = exp_dir / "reports" / "metrics.json"
        self.path, self.cfg = exp_dir / "reports" / PARTS_FILE, cfg
        self.metrics_sha256 = file_sha256(metrics) if metrics.is_file() else None

    def settings_digest(self, part: str) -> str:
        """The digest of what `part`'s figures depend on besides its weights and the training."""
        import hashlib

        from omegaconf import OmegaConf

        from pillsnap.data.scan import manifest_file
        from pillsnap.utils.io import file_sha256

        settings = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                    for key in PART_SETTINGS[part] if (value := OmegaConf.select(self.cfg, key)) is not None}
        manifests = Path(self.cfg.paths.manifest_dir)
        files = (manifest_file(manifests), manifests / "class_map.json")
        settings["data files"] = {path.name: file_sha256(path) for path in files if path and path.is_file()}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()

    def _read(self) -> dict:
        try:
            parts = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        same = isinstance(parts, dict) and parts.get("metrics_sha256") == self.metrics_sha256
        return parts if same else {}

    def tested(self, part: str, ckpt: Path, test: Callable[[], Any], sound: Callable[[Any], bool]) -> Any:
        """`test()`'s figures of the weights `ckpt`: kept from an earlier try of the same training, weights (their
        SHA-256) and settings, where they are `sound` (hand-edited or of another version, they are not), else
        measured now and kept at once."""
        from pillsnap.utils.io import file_sha256

        key = {"weights_sha256": file_sha256(ckpt), "settings_sha256": self.settings_digest(part)}
        parts = self._read()
        kept = parts.get(part)
        if (isinstance(kept, dict) and all(kept.get(k) == v for k, v in key.items()) and "figures" in kept
                and sound(kept["figures"])):
            LOGGER.info("final test: the %s's figures are kept from an earlier try (%s)", part, self.path)
            return kept["figures"]
        figures = test()
        parts = {**self._read(), "metrics_sha256": self.metrics_sha256, part: {**key, "figures": figures}}
        save_json(self.path, parts)
        return figures


def _classification_figures(figures: Any) -> bool:
    """(figures at the labelled boxes, figures on the single-pill photos or None), as _test_classification gives."""
    return (isinstance(figures, list) and len(figures) == 2 and isinstance(figures[0], dict)
            and (figures[1] is None or isinstance(figures[1], dict)))


def final_test_evaluation(cfg: DictConfig, build_loaders: Any = None, device: str | None = None) -> dict:
    """Evaluate classification_best.pt / detection_best.pt on the test split; write final_test_results.json.
    `device`: where (default: cuda when available)."""
    from pillsnap.data import build_dataloaders_twostage

    exp_dir = Path(cfg.paths.exp_dir)
    ckpts = exp_dir / "checkpoints"
    if not (ckpts / "classification_best.pt").is_file():
        raise FileNotFoundError(f"No classification_best.pt in {ckpts}: train before the final evaluation")
    loaders = (build_loaders or build_dataloaders_twostage)(cfg, build_test=True)
    cls_test, det_test = loaders.cls_test, loaders.det_test
    device = resolve_device(device)
    parts = TestParts(exp_dir, cfg)
    cls_ckpt, det_ckpt = ckpts / "classification_best.pt", ckpts / "detection_best.pt"
    at_boxes, single = parts.tested("classification", cls_ckpt,
                                    lambda: list(_test_classification(cls_ckpt, cls_test, device, cfg)),
                                    _classification_figures)
    test: dict[str, dict] = {"classification": at_boxes}
    if det_test is not None and det_ckpt.is_file():
        test["detection"] = parts.tested("detection", det_ckpt,
                                         lambda: _test_detection(det_ckpt, det_test, device, cfg),
                                         lambda figures: isinstance(figures, dict))
    metrics_path = exp_dir / "reports" / "metrics.json"
    # the validation figures of the same weights (the best checkpoints), not of the last epoch
    val = best_checkpoint_metrics(read_json(metrics_path), ckpts) if metrics_path.is_file() else {}
    gaps = {f"{section}.{k}": round(float(val[section][k]) - float(v), 4)
            for section, block in test.items() for k, v in block.items()
            if isinstance(v, float) and isinstance(val.get(section, {}).get(k), (int, float))}
    goals = _goals(test, single)
    ready = goals["overall_target_met"]
    # The file speaks the design's names (accuracy, mAP_0.5); everything inside PillSnap says acc, mAP@0.5.
    named = {section: {final_test_name(k): v for k, v in block.items()} for section, block in test.items()}
    if single is not None:
        named["classification_single_photos"] = {final_test_name(k): v for k, v in single.items()}
    gaps = {f"{key.split('.', 1)[0]}.{final_test_name(key.split('.', 1)[1])}": v for key, v in gaps.items()}
    result = {"test_results": named, "val_minus_test": gaps, "business_goals": goals,
              "recommendation": "READY_FOR_PRODUCTION" if ready else "NEEDS_IMPROVEMENT",
              "ready_for_production": ready,
              "improvements": [] if ready else [f"{k}: {g['value']} < {g['target']}" for k, g in goals.items()
                                                if isinstance(g, dict) and not g["met"]]}
    if parts.metrics_sha256 is not None:  # which training these results follow (final_test_written)
        result["metrics_sha256"] = parts.metrics_sha256
    save_json(exp_dir / "reports" / "final_test_results.json", result)
    parts.path.unlink(missing_ok=True)  # the results hold them now
    mark_done(exp_dir, "final_test")
    LOGGER.info("final test evaluation: %s -> %s", result["recommendation"],
                exp_dir / "reports" / "final_test_results.json")
    return result
