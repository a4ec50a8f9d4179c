"""Two-stage inference: classify a whole single-pill photo, or detect pills and classify each crop; `auto` gates.

`Predictor` holds the models (classifier at start, detector lazily when `inference.lazy_load_detector`);
`predict_pipeline` is the thin functional entry point over a cached Predictor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pillsnap.infer.gating import GatingDecision, check_mode, decide_route, hard_case_reasons
from pillsnap.infer.hard_cases import HardCaseLog
from pillsnap.infer.preprocess import crop_pill, letterbox, load_image, locate_pill, single_crop_box, unletterbox_boxes
from pillsnap.utils import read_json, resolve_device
from pillsnap.utils.boxes import xywh_to_xyxy

LOGGER = logging.getLogger(__name__)
CLASSIFIER_CKPTS = ("classification_best.pt", "best.pt", "classification_last.pt", "last.pt")
DETECTOR_CKPTS = ("detection_best.pt", "detection_last.pt")


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _default_cfg() -> Any:
    from pillsnap.config import load_config

    return load_config("config.yaml" if Path("config.yaml").is_file() else None, dotenv_path=None)


class Predictor:
    """Loaded models + settings for one experiment directory ({exp_dir}/checkpoints/*.pt, classes.json)."""

    def __init__(self, exp_dir: str | Path, cfg: Any = None, device: str | None = None) -> None:
        from pillsnap.models.classifier import load_classifier_for_inference

        self.exp_dir = Path(exp_dir)
        self.cfg = cfg if cfg is not None else _default_cfg()
        self.settings = self.cfg.inference
        self.device = resolve_device(device)
        ckpt_dir = self.exp_dir / "checkpoints"
        cls_path = _first_existing(ckpt_dir, CLASSIFIER_CKPTS)
        if cls_path is None:
            raise FileNotFoundError(f"No classifier checkpoint in {ckpt_dir} (looked for "
                                    f"{', '.join(CLASSIFIER_CKPTS)}); train first (pillsnap train / pillsnap demo)")
        self.classifier, snapshot = load_classifier_for_inference(cls_path, device=str(self.device))
        self.class_names, self.class_map = self._load_classes(ckpt_dir / "classes.json")
        self._check_classes(cls_path)
        from pillsnap.data import classification_transform

        self.transform = classification_transform(int(snapshot["model"]["image_size"]), train=False)
        self.crop_margin = float(snapshot.get("data", {}).get("crop_margin", self.cfg.data.crop_margin))
        self.detector_path = _first_existing(ckpt_dir, DETECTOR_CKPTS)
        self._detector: torch.nn.Module | None = None
        self.det_image_size = 640
        self.hard_cases = HardCaseLog(self.exp_dir, bool(self.settings.hard_cases.thumbnails))
        if not self.settings.lazy_load_detector:
            self.detector  # noqa: B018 - load now rather than on the first combo photo
        LOGGER.info("predictor: classifier %s (%d classes), detector %s", cls_path.name, len(self.class_names),
                    self.detector_path.name if self.detector_path else "none")

    @staticmethod
    def _load_classes(path: Path) -> tuple[list[str], dict]:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the trainer writes it next to the checkpoints")
        data = read_json(path)
        return list(data["class_names"]), dict(data.get("class_map") or {})

    def _check_classes(self, cls_path: Path) -> None:
        out_features = self.classifier(torch.zeros(1, 3, 32, 32, device=self.device)).shape[-1]
        if out_features != len(self.class_names):
            raise ValueError(f"{cls_path} predicts {out_features} classes but classes.json lists "
                             f"{len(self.class_names)}: they come from different runs")

    @property
    def has_detector(self) -> bool:
        return self.detector_path is not None

    @property
    def detector(self) -> torch.nn.Module:
        """The detector, loaded on first use: a predictor that only sees single-pill photos never pays for it."""
        if self._detector is None:
            if self.detector_path is None:
                raise FileNotFoundError(f"No detector checkpoint in {self.exp_dir / 'checkpoints'} "
                                        f"(looked for {', '.join(DETECTOR_CKPTS)}): combo mode needs one")
            from pillsnap.models.detector import detector_settings, load_detector_for_inference

            self._detector, snapshot = load_detector_for_inference(self.detector_path, device=str(self.device))
            self.det_image_size = detector_settings(snapshot)[1]
            LOGGER.info("predictor: detector %s loaded (%d px)", self.detector_path.name, self.det_image_size)
        return self._detector

    @torch.no_grad()
    def classify(self, crops: list[Image.Image]) -> list[dict]:
        """Top-k (mapping_code, name, probability) for each crop, best first."""
        if not crops:
            return []
        x = torch.stack([self.transform(c) for c in crops]).to(self.device)
        probs = torch.softmax(self.classifier(x).float(), dim=-1).cpu()
        k = min(int(self.settings.topk), probs.shape[-1])
        values, indices = probs.topk(k, dim=-1)
        return [[self._candidate(int(i), float(p)) for p, i in zip(vs.tolist(), ids.tolist(), strict=True)]
                for vs, ids in zip(values, indices, strict=True)]

    def _candidate(self, index: int, prob: float) -> dict:
        code = self.class_names[index]
        return {"mapping_code": code, "name": (self.class_map.get(code) or {}).get("name", ""), "probability": prob}

    @torch.no_grad()
    def detect(self, image: Image.Image, conf_threshold: float, forward: Any = None) -> np.ndarray:
        """Pill boxes [N, 5] (x, y, w, h in image pixels, confidence), left to right, via the shared NMS.

        `forward` (letterboxed images -> raw output) replaces the torch detector, e.g. an OnnxDetector."""
        from pillsnap.models.detector import postprocess_detections, raw_detector_output

        model = self.detector  # also sets det_image_size from the checkpoint
        tensor, scale, pad = letterbox(image, self.det_image_size)
        raw = forward(tensor) if forward is not None else raw_detector_output(model, tensor.to(self.device))
        dets = postprocess_detections(raw, conf_threshold, float(self.settings.iou_threshold))[0].numpy()
        boxes = unletterbox_boxes(dets[:, :4], scale, pad, image.size)
        out = np.concatenate([boxes, dets[:, 4:5]], 1) if len(dets) else np.zeros((0, 5))
        return out[np.argsort(out[:, 0], kind="stable")]

    def _pill(self, bbox: Any, topk: list[dict], det_conf: float | None) -> dict:
        return {"bbox": [int(round(v)) for v in bbox], "det_confidence": det_conf, **topk[0], "topk": topk}

    def _single(self, image: Image.Image) -> dict:
        """Classify the photo as one pill: crop it like training when it stands out, else a centred square."""
        box = locate_pill(image) if self.settings.single_locate else None
        if box is not None:
            crop = crop_pill(image, box, self.crop_margin)
        else:
            box = single_crop_box(image.size, float(self.settings.single_crop))
            crop = image.crop(tuple(xywh_to_xyxy(box).tolist()))
        return self._pill(box, self.classify([crop])[0], None)

    def _combo(self, image: Image.Image, dets: np.ndarray) -> list[dict]:
        crops = [crop_pill(image, d[:4], self.crop_margin) for d in dets]
        return [self._pill(d[:4], topk, float(d[4])) for d, topk in zip(dets, self.classify(crops), strict=True)]

    def _route(self, image: Image.Image, mode: str, conf: float, single: dict | None) -> tuple[GatingDecision, list]:
        threshold = float(self.settings.single_confidence_threshold)
        conf_single = single["probability"] if single else None
        dets = None
        if mode == "combo" or (mode == "auto" and self.has_detector):
            dets = self.detect(image, conf)
        decision = decide_route(mode, conf_single, None if dets is None else len(dets), threshold)
        if decision.mode_used == "single":
            return decision, [single]
        if dets is None:  # auto fell back but no detector was trained: keep the whole-image answer
            LOGGER.warning("auto: %s but no detector checkpoint; answering single", decision.fallback_reason)
            return replace(decision, mode_used="single"), [single]
        pills = self._combo(image, dets)
        if mode == "auto" and not pills:
            return replace(decision, mode_used="single"), [single]
        return decision, pills

    def predict(self, image: Any, mode: str | None = None, conf_threshold: float | None = None) -> dict:
        """Predict the pills in one photo (path, zip:<zip>!<member>, PIL image or HxWx3 uint8 array)."""
        start = time.perf_counter()
        mode = check_mode(mode or str(self.settings.mode))
        conf = float(self.settings.conf_threshold if conf_threshold is None else conf_threshold)
        img, name = load_image(image)
        single = self._single(img) if mode in ("single", "auto") else None
        decision, pills = self._route(img, mode, conf, single)
        LOGGER.debug("gating: %s mode=%s single_conf=%s -> %s (%s), %d pill(s)", name or "<image>", mode,
                    "n/a" if single is None else f"{single['probability']:.3f}", decision.mode_used,
                    decision.fallback_reason or "-", len(pills))
        result = {"image": name, "mode": mode, **decision.to_dict(), "num_pills": len(pills), "pills": pills,
                  "image_size": list(img.size), "elapsed_ms": round((time.perf_counter() - start) * 1000, 1)}
        self._log_hard_case(result, img)
        return result

    def _log_hard_case(self, result: dict, image: Image.Image) -> None:
        hard = self.settings.hard_cases
        reasons = hard_case_reasons(result["mode"], result["mode_used"], result["single_confidence"],
                                    result["num_pills"], float(hard.single_confidence_below))
        result["hard_case"] = reasons
        if reasons and hard.enabled:
            self.hard_cases.write(result, reasons, image)


_PREDICTORS: dict[tuple[str, str], Predictor] = {}


def get_predictor(exp_dir: str | Path | None = None, cfg: Any = None, device: str | None = None) -> Predictor:
    """A Predictor per (exp_dir, device), built once and reused (models load once per process)."""
    cfg = cfg if cfg is not None else _default_cfg()
    exp_dir = Path(exp_dir or cfg.paths.exp_dir).resolve()
    key = (str(exp_dir), str(resolve_device(device)))
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor(exp_dir, cfg, device)
    return _PREDICTORS[key]


def predict_pipeline(image: Any, mode: str = "auto", conf_threshold: float = 0.3, *, exp_dir: str | Path | None = None,
                     predictor: Predictor | None = None, cfg: Any = None, device: str | None = None) -> dict:
    """Predict one photo: dict with mode_used, gating fields (gating_score, single_confidence, fallback_reason)
    and `pills` (bbox [x, y, w, h], top-1 mapping_code/name/probability and `topk`). Models come from
    `predictor`, or a cached Predictor for `exp_dir` (default: cfg.paths.exp_dir)."""
    predictor = predictor or get_predictor(exp_dir, cfg, device)
    return predictor.predict(image, mode=mode, conf_threshold=conf_threshold)
