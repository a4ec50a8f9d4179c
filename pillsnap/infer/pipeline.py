"""Two-stage inference: classify a whole single-pill photo, or detect pills and classify each crop; `auto` gates
with the detector's view of every photo, so that no pill is hidden. Routing looks at the classifier alone; only the
pills then answered are read (OCR, infer/evidence.py) and given their final answer (infer/answer.py: the imprint
and the user's hints re-rank the candidates, and a pill the calibrated unknown-pill rule rejects is answered as
unknown, mapping_code null). Probabilities are calibrated when the run was calibrated.

`Predictor` holds the models (classifier at start, detector lazily when `inference.lazy_load_detector`), run by
torch or, with `inference.backend: onnx`, by onnxruntime from `{exp_dir}/export/` (`pillsnap export`);
`predict_pipeline` is the thin functional entry point over a cached Predictor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from pillsnap.infer.answer import Classified, UnknownRule, classifier_candidates, decide_answer
from pillsnap.infer.artefacts import (
    DETECTOR_CKPTS,
    Temperatures,
    configured_set_rule,
    configured_unknown_rule,
    find_checkpoints,
    load_calibration_for,
    load_classes,
)
from pillsnap.infer.box_check import BoxCheck, box_check_for, check_box_settings
from pillsnap.infer.evidence import Evidence
from pillsnap.infer.gating import (
    NO_SURE_PILL,
    PILL_LIMIT,
    GatingDecision,
    check_mode,
    decide_route,
    distinct_pills,
    hard_case_reasons,
)
from pillsnap.infer.hard_cases import HardCaseLog
from pillsnap.infer.matching import Hints, KnownImprints
from pillsnap.infer.preprocess import crop_pill, letterbox, load_image, single_photo_crop, unletterbox_boxes
from pillsnap.infer.thresholds import calibrated_evidence, fit_without
from pillsnap.infer.unknown import CROP_SOURCES, UnknownAnswer, crop_source
from pillsnap.models.detector import NMS_MAX_DET
from pillsnap.utils import resolve_device
from pillsnap.utils.boxes import xywh_to_xyxy
from pillsnap.utils.logs import FailureRun

LOGGER = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx")
WARM_UP_PX = 256  # the blank photo warm_up runs through every model: any size works, this one is cheap
FORWARD_CHUNK = 16  # crops through the classifier at once (a 384 px crop holds ~25 MB of activations on a CPU)
AGREEMENT_IOU = 0.5  # the detected box and the single path's located pill must overlap this much to be one pill


def _default_cfg(exp_dir: str | Path | None = None) -> Any:
    """The run's own config (from any working directory) when there is a run; else ./config.yaml or the defaults."""
    from pillsnap.config.run import load_cli_config

    return load_cli_config(exp_dir, None, dotenv_path=None)


class WholePhoto(NamedTuple):
    """The single path's view of a photo before any evidence: the crop, its box [x, y, w, h], whether the pill was
    located on the backdrop (else a centred square) and the classifier's output."""

    crop: Image.Image
    box: Any
    located: bool
    classified: Classified


class Predictor:
    """Loaded models + settings for one experiment directory ({exp_dir}/checkpoints/*.pt, classes.json)."""

    def __init__(self, exp_dir: str | Path, cfg: Any = None, device: str | None = None, sets: bool = True) -> None:
        """`sets`: build the prediction-set rule (False for a predictor that only measures features, as enrolling
        does with imprint reading off: the sets, calibrated with reading on, would be refused with a warning)."""
        self.exp_dir = Path(exp_dir)
        self.cfg = cfg if cfg is not None else _default_cfg(exp_dir)
        self.settings = self.cfg.inference
        # the detector's boxes answered per photo at most (a run's config from before the key: NMS's own)
        self.max_pills = int(self.settings.get("max_pills", NMS_MAX_DET))
        self.device = resolve_device(device)
        self.backend = str(self.settings.backend)
        if self.backend not in BACKENDS:
            raise ValueError(f"inference.backend must be one of {BACKENDS}, got {self.backend!r}")
        ckpt_dir = self.exp_dir / "checkpoints"
        self.classifier_path, self.detector_path = find_checkpoints(self.exp_dir)
        self.export: dict | None = None  # export.json when the onnx backend runs
        image_size = self._load_classifier()
        self.class_names, self.class_map = load_classes(ckpt_dir / "classes.json")
        self._check_classes(self.classifier_path, image_size)
        imprint = self.settings.imprint
        self.check_unknown = bool(imprint.enabled) and bool(imprint.unknown_check)
        self.calibration = (load_calibration_for(ckpt_dir, self.classifier_path, self.classifier_sha256,
                                                 self.check_unknown) if self.settings.calibration else None)
        self.unknown = self._unknown_rule()
        self.unknown_rules = self._answer_rules(self.unknown)  # what each pill's answer applies, by crop source
        self.set_rule = configured_set_rule(self.calibration if sets else None, self.settings.prediction_set,
                                            bool(imprint.enabled), self.check_unknown, int(self.settings.topk),
                                            self.unknown.rule if self.unknown.active else None)
        self.set_rules = {source: None if self.set_rule is None else self.set_rule.for_source(source)
                          for source in CROP_SOURCES}  # each crop source's own threshold where calibration has one
        # the imprint read's weights per crop source, scaled where calibration fit them so that the answers'
        # probabilities mean what they say (pillsnap.eval.answer_calibration.fit_evidence_scales), and the thresholds
        # its sets were fit with
        self.thresholds = calibrated_evidence(self.calibration)[1]
        self.weights = {source: calibrated_evidence(self.calibration, source)[0] for source in CROP_SOURCES}
        # the temperatures per crop source, read once (a malformed one fails here, at start-up)
        self.temperatures = Temperatures.from_stored(self.calibration)
        missing = fit_without(self.calibration) if imprint.enabled else ()
        if "likelihoods" in missing:
            LOGGER.warning("predictor: the calibration predates the candidates' likelihoods as imprint evidence; "
                           "answers are made without them (recalibrate: pillsnap calibrate --exp EXP)")
        elif "recall" in missing:
            LOGGER.warning("predictor: the calibration predates drugs below the top-k brought back by their imprint; "
                           "answers weigh the top-k alone (recalibrate: pillsnap calibrate --exp EXP)")
        if "reading" in missing:
            LOGGER.warning("predictor: the calibration was fit against the recogniser's reading as an exact string; "
                           "answers measure it as an imprint now (recalibrate: pillsnap calibrate --exp EXP)")
        # the imprint check (imprint.unknown_check): every pill is read, and a legible imprint like none of its
        # candidates' answers "unknown pill" (answer.foreign_imprint); every known drug's imprints name the one it
        # is (set again when enrolments change)
        self.known_imprints: KnownImprints | None = None
        self.evidence = Evidence(self.class_map, bool(imprint.enabled), int(imprint.threads), self.thresholds,
                                 self.check_unknown, int(imprint.get("parallel_reads", 0) or 0))
        from pillsnap.data import classification_transform

        self.transform = classification_transform(image_size, train=False)
        self._detector: Any = None
        self.det_image_size = 0  # the detector's input size, read from its checkpoint when it loads
        self.box_settings = check_box_settings(self.settings.get("box_check") or {})  # (enabled, miss rate)
        self.hard_cases = HardCaseLog.from_config(self.exp_dir, self.settings.hard_cases)
        self._hard_case_failures = FailureRun(LOGGER)  # hard cases that could not be logged
        if not self.settings.lazy_load_detector:
            self.detector  # noqa: B018 - load now rather than on the first combo photo
        # (class names, class map) as trained; enrolled drugs (infer/enrolment.py) join them
        self.trained = (list(self.class_names), dict(self.class_map))
        self.enrolled: Any = None
        self._enrol_stamp: Any = False  # the enrolment store's stamp when last read (False: never read)
        self.refresh_enrolment()
        LOGGER.info("predictor (%s): classifier %s (%d classes), detector %s", self.backend, self.classifier_path.name,
                    len(self.class_names), self.detector_path.name if self.detector_path else "none")

    def _load_classifier(self) -> int:
        """Load the classifier for the configured backend; sets crop_margin, returns the input size."""
        if self.backend == "onnx":
            from pillsnap.models.export import EXPORT_DIR, OnnxClassifier, read_export_meta

            export_dir = self.exp_dir / EXPORT_DIR
            self.export = read_export_meta(export_dir, {"classifier": self.classifier_path,
                                                        "detector": self.detector_path})
            entry = self.export["classifier"]
            self.classifier = OnnxClassifier(export_dir / entry["file"], self.device)
            self.crop_margin = float(entry["crop_margin"])
            return int(entry["image_size"])
        from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference

        model, snapshot = load_classifier_for_inference(self.classifier_path, device=str(self.device))
        self.classifier = WithFeatures(model).eval()
        self.crop_margin = float(snapshot.get("data", {}).get("crop_margin", self.cfg.data.crop_margin))
        return int(snapshot["model"]["image_size"])

    @cached_property
    def classifier_sha256(self) -> str:
        """The classifier file's SHA-256, hashed once (what calibration and enrolments are bound to)."""
        from pillsnap.utils.io import file_sha256

        return file_sha256(self.classifier_path)

    @cached_property
    def box_check(self) -> BoxCheck | None:
        """Whether a detector box holds a pill at all (infer/box_check.py), set up on the first photo of several
        pills: the detector file is hashed once. None without a detector, when off, or not calibrated for it."""
        if self.detector_path is None:
            return None
        return box_check_for(self.calibration, self.detector_path, *self.box_settings)

    def _unknown_rule(self) -> UnknownAnswer:
        """The configured unknown-pill rule with its calibrated threshold (configured_unknown_rule), off where the
        ONNX export lacks the features the rule needs."""
        unknown = configured_unknown_rule(self.calibration, self.exp_dir / "checkpoints", self.settings)
        if (unknown.rule == "feature_distance" and unknown.threshold is not None and self.export is not None
                and len(self.classifier.output_names) < 2):
            LOGGER.warning("the ONNX classifier in %s has no features output (exported by an older PillSnap): no "
                           "pill is answered as unknown; run `pillsnap export --exp %s`", self.classifier.path,
                           self.exp_dir)
            return UnknownAnswer(unknown.rule, None)
        return unknown

    def _answer_rules(self, unknown: UnknownAnswer) -> dict[str, UnknownRule]:
        return {source: unknown.for_answer(len(self.class_names), source) for source in CROP_SOURCES}

    @torch.no_grad()
    def _check_classes(self, cls_path: Path, image_size: int) -> None:
        out_features = self.classifier(torch.zeros(1, 3, image_size, image_size, device=self.device))[0].shape[-1]
        if out_features != len(self.class_names):
            raise ValueError(f"{cls_path} predicts {out_features} classes but classes.json lists "
                             f"{len(self.class_names)}: they come from different runs")

    @property
    def has_detector(self) -> bool:
        return self.detector_path is not None

    @property
    def detector(self) -> Any:
        """The detector (a torch module or an OnnxDetector), loaded on first use: a predictor that only sees
        single-pill photos never pays for it."""
        if self._detector is None:
            if self.detector_path is None:
                raise FileNotFoundError(f"No detector checkpoint in {self.exp_dir / 'checkpoints'} "
                                        f"(looked for {', '.join(DETECTOR_CKPTS)}): combo mode needs one")
            self._detector, self.det_image_size = self._load_detector()
            LOGGER.info("predictor: detector %s loaded (%s, %d px)", self.detector_path.name, self.backend,
                        self.det_image_size)
        return self._detector

    def _load_detector(self) -> tuple[Any, int]:
        if self.export is not None:
            from pillsnap.models.export import EXPORT_DIR, OnnxDetector

            entry = self.export["detector"]
            return OnnxDetector(self.exp_dir / EXPORT_DIR / entry["file"], self.device), int(entry["image_size"])
        from pillsnap.models.detector import detector_settings, load_detector_for_inference

        model, snapshot = load_detector_for_inference(self.detector_path, device=str(self.device))
        return model, detector_settings(snapshot)[1]

    def model_files(self) -> dict[str, Path]:
        """The files the models are (or will be, for a lazy detector) loaded from, by role."""
        files = {"classifier": self.classifier_path, "detector": self.detector_path}
        if self.export is not None:
            from pillsnap.models.export import EXPORT_DIR

            files = {role: path and self.exp_dir / EXPORT_DIR / self.export[role]["file"]
                     for role, path in files.items()}
        return {role: path for role, path in files.items() if path is not None}

    def warm_up(self) -> None:
        """Load every model and run each once on a blank photo, so that the first real request does not pay for
        it (no hard-case record is written)."""
        blank = Image.new("RGB", (WARM_UP_PX, WARM_UP_PX), (128, 128, 128))
        self.classify([blank])
        if self.has_detector:
            self.detect(blank, float(self.settings.conf_threshold))
            self.box_check  # noqa: B018 - hash the detector now, and say now if its boxes go unchecked

    def refresh_enrolment(self) -> bool:
        """Pick up drugs enrolled or removed since the last call (pillsnap enrol, the API; infer/enrolment.py):
        classify calls it, so a served model answers them without a restart. One stat per call; the store is
        read again only when it was committed since. True when the enrolled drugs changed."""
        from pillsnap.infer.enrolment import listed_codes, load_space, store_stamp

        ckpt_dir = self.exp_dir / "checkpoints"
        stamp = store_stamp(ckpt_dir)
        if stamp == self._enrol_stamp:
            return False
        names, class_map = self.trained
        space, drugs = load_space(ckpt_dir, self.classifier_path, self.calibration,
                                  None if stamp is None else self.classifier_sha256)
        # The class map first: a classify on another thread that already sees the new drugs finds their names.
        self.class_map = {**class_map, **{d["mapping_code"]: d for d in drugs}}
        self.evidence.class_map = self.class_map
        self.known_imprints = KnownImprints(self.class_map) if self.check_unknown else None
        self.enrolled, self._enrol_stamp = space, stamp
        self.class_names = names + [d["mapping_code"] for d in drugs]
        self.unknown_rules = self._answer_rules(self.unknown)
        if drugs:
            LOGGER.info("predictor: %d enrolled drug(s) answered: %s", len(drugs),
                        listed_codes([d["mapping_code"] for d in drugs]))
        return True

    @torch.no_grad()
    def forward(self, crops: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The classifier's logits [N, C] and pre-logit features [N, D] (None: this backend gives none) of the crops,
        each transformed as the classifier was evaluated in training."""
        outputs = [self.classifier(torch.stack([self.transform(c) for c in crops[i:i + FORWARD_CHUNK]]).to(self.device))
                   for i in range(0, len(crops), FORWARD_CHUNK)]  # a photo of many pills: memory of one chunk at a time
        logits = torch.cat([out[0] for out in outputs])
        return logits, None if outputs[0][1] is None else torch.cat([out[1] for out in outputs])

    @torch.no_grad()
    def classify(self, crops: list[Image.Image], source: str | Sequence[str] | None = None) -> list[Classified]:
        """Each crop's top-k (mapping_code, name, probability; best first, probabilities calibrated at the
        temperature of its crop source: "single" or "combination", one for all or one per crop; None: the overall
        one) and how unknown it looks under the run's unknown-pill rule; enrolled drugs among them
        (infer/enrolment.py)."""
        if not crops:
            return []
        self.refresh_enrolment()
        space = self.enrolled  # read once: a reload on another thread swaps it whole
        logits, features = self.forward(crops)
        sources = [source] * len(crops) if source is None or isinstance(source, str) else list(source)
        if len(sources) != len(crops):
            raise ValueError(f"classify: {len(sources)} crop sources for {len(crops)} crops")
        temperature = torch.as_tensor(self.temperatures.per_row(sources), dtype=torch.float32)[:, None]
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1).numpy()
        feats = None if features is None else features.float().cpu().numpy()
        names, distances = self.trained[0], None
        if space is not None and feats is not None:
            probs, distances = space.merge(probs, feats)
            names = names + list(space.codes)
        scores = self.unknown.scores(probs, feats, distances)
        tops = classifier_candidates(probs, int(self.settings.topk), names, self.class_map, self.thresholds)
        return [Classified(topk, score, reserve) for (topk, reserve), score in zip(tops, scores, strict=True)]

    @torch.no_grad()
    def detect(self, image: Image.Image, conf_threshold: float, forward: Any = None, max_det: int = NMS_MAX_DET
               ) -> np.ndarray:
        """Pill boxes [N, 5] (x, y, w, h in image pixels, confidence), left to right, via the shared NMS, the
        `max_det` most confident at most (answering passes inference.max_pills; measuring keeps NMS's own 300).

        `forward` (letterboxed images -> raw output) replaces the torch detector, e.g. an OnnxDetector."""
        from pillsnap.models.detector import postprocess_detections, raw_detector_output

        model = self.detector  # also sets det_image_size from the checkpoint
        tensor, scale, pad = letterbox(image, self.det_image_size)
        raw = forward(tensor) if forward is not None else raw_detector_output(model, tensor.to(self.device))
        dets = postprocess_detections(raw, conf_threshold, float(self.settings.iou_threshold),
                                      max_det=max_det)[0].numpy()
        boxes = unletterbox_boxes(dets[:, :4], scale, pad, image.size)
        out = np.concatenate([boxes, dets[:, 4:5]], 1) if len(dets) else np.zeros((0, 5))
        return out[np.argsort(out[:, 0], kind="stable")]

    def _answer(self, read: Any, bbox: Any, classified: Classified, det_conf: float | None,
                hints: Hints | None, box_doubt: str | None = None) -> dict:
        """One pill's answer (infer/answer.py), given its imprint `read` (evidence.read: None where a read cannot
        change the answer)."""
        source = crop_source(det_conf)
        answer = decide_answer(classified, self.class_map, read, hints, self.unknown_rules[source], self.thresholds,
                               self.weights[source], self.set_rules[source], self.known_imprints,
                               one_pill=det_conf is None, box_doubt=box_doubt)
        return {"bbox": [int(round(v)) for v in bbox], "det_confidence": det_conf, **answer.to_dict()}

    def _whole_photo(self, image: Image.Image) -> WholePhoto:
        """The photo as one pill, classified: cropped like training when the pill stands out, else a centred
        square."""
        crop, box, located = single_photo_crop(image, self.crop_margin, bool(self.settings.single_locate),
                                               float(self.settings.single_crop))
        return WholePhoto(crop, box, located, self.classify([crop], "single")[0])

    def _single(self, whole: WholePhoto, hints: Hints | None) -> list[dict]:
        read = self.evidence.read(whole.crop, whole.classified.topk)
        return [self._answer(read, whole.box, whole.classified, None, hints)]

    def _doubts(self, dets: np.ndarray | None, conf_threshold: float) -> list[str | None]:
        """Per detected box, why it may hold no pill (infer/box_check.py), or None."""
        if dets is None or not len(dets) or self.box_check is None:
            return [None] * (0 if dets is None else len(dets))
        return [self.box_check.doubt(float(conf), conf_threshold) for conf in dets[:, 4]]

    def _combo(self, image: Image.Image, dets: np.ndarray, hints: Hints | None,
               doubts: Sequence[str | None]) -> list[dict]:
        """Each detected box's answer; `doubts`: why a box may hold no pill (None: it holds one)."""
        crops = [crop_pill(image, d[:4], self.crop_margin) for d in dets]
        classified = self.classify(crops, "combination")
        reads = self.evidence.read_all(crops, [c.topk for c in classified])  # the pills read side by side
        return [self._answer(read, box, pill, float(conf), hints, doubt)
                for read, box, pill, conf, doubt in zip(reads, dets[:, :4], classified, dets[:, 4], doubts,
                                                        strict=True)]

    def _agrees(self, image: Image.Image, whole: WholePhoto, det: np.ndarray) -> bool:
        """Does the one detected pill confirm the whole-photo answer? Where the single path located its pill: the
        same place (one box around several pills, or a pill the detector missed, fails). Where it could not and
        classified a centred square: the same drug in the detected crop."""
        from pillsnap.metrics.detection import box_iou_xyxy

        if whole.located:
            iou = box_iou_xyxy(xywh_to_xyxy(np.asarray([whole.box], float)), xywh_to_xyxy(det[None, :4]))[0, 0]
            return bool(iou >= AGREEMENT_IOU)
        crop_top = self.classify([crop_pill(image, det[:4], self.crop_margin)], "combination")[0].topk[0]
        return crop_top["mapping_code"] == whole.classified.topk[0]["mapping_code"]

    def _route(self, image: Image.Image, mode: str, conf: float, whole: WholePhoto | None,
               hints: Hints | None) -> tuple[GatingDecision, list]:
        """Route on the classifier's view (no evidence yet), then answer only the pills of the chosen path.

        Auto routes on the distinct pills the detector saw (distinct_pills): a faint second box of a pill does not
        make a photo one of several. A photo of several goes to combo, where every box is answered (a box that may
        hold no pill as "maybe no pill"). When the one pill seen is a box that may hold none, away from the
        whole-photo pill, the whole-photo answer stands, flagged, and the box is answered beside it."""
        threshold = float(self.settings.single_confidence_threshold)
        conf_single = whole.classified.topk[0]["probability"] if whole else None
        dets = None
        if mode == "combo" or (mode == "auto" and self.has_detector):
            dets = self.detect(image, conf, max_det=self.max_pills)
        doubts = self._doubts(dets, conf)
        seen = None if dets is None else distinct_pills(dets, doubts) if mode == "auto" else list(range(len(dets)))
        one_box = mode == "auto" and seen is not None and len(seen) == 1
        agrees = self._agrees(image, whole, dets[seen[0]]) if one_box else None
        decision = decide_route(mode, conf_single, None if seen is None else len(seen), threshold, agrees,
                                has_detector=self.has_detector)
        decision = replace(decision, num_detections=None if dets is None else len(dets),
                           num_doubted=sum(doubt is not None for doubt in doubts))
        if dets is not None and len(dets) >= self.max_pills:  # there may be more than were answered
            decision = replace(decision, flags=(*decision.flags, PILL_LIMIT))
        if decision.mode_used == "single":
            return decision, self._single(whole, hints)
        if dets is None:  # auto fell back but no detector was trained: keep the whole-image answer
            LOGGER.warning("auto: %s but no detector checkpoint; answering single", decision.fallback_reason)
            return replace(decision, mode_used="single"), self._single(whole, hints)
        if one_box and doubts[seen[0]] is not None and agrees is False:
            faint = seen[0]  # a dish's rim, most likely: the pill the whole photo shows is answered, the box beside
            decision = replace(decision, mode_used="single", fallback_reason=None,
                               flags=(*decision.flags, NO_SURE_PILL))
            return decision, self._single(whole, hints) + self._combo(image, dets[[faint]], hints, [doubts[faint]])
        return decision, self._combo(image, dets, hints, doubts)

    def predict(self, image: Any, mode: str | None = None, conf_threshold: float | None = None,
                name: str | None = None, hints: Hints | None = None) -> dict:
        """Predict the pills in one photo (path, zip:<zip>!<member>, PIL image or HxWx3 uint8 array).

        A PIL image is read as its file would be: turned by its EXIF orientation tag (Image.open leaves it to the
        caller), so an image turned by hand with transpose/rotate, which keep the tag, should have the tag dropped
        first (ImageOps.exif_transpose turns and drops it).

        `name` is what the result and its hard-case record call the image (e.g. where the API kept an upload);
        by default the path, or None for in-memory images. `hints` (what the user sees on the pill: imprint,
        colour, shape) re-rank every pill's candidates; an answer they contradict says so (hints_conflict)."""
        start = time.perf_counter()
        mode = check_mode(mode or str(self.settings.mode))
        conf = float(self.settings.conf_threshold if conf_threshold is None else conf_threshold)
        img, loaded_name = load_image(image)
        name = name or loaded_name
        whole = self._whole_photo(img) if mode in ("single", "auto") else None
        decision, pills = self._route(img, mode, conf, whole, hints)
        LOGGER.debug("gating: %s mode=%s single_conf=%s -> %s (%s), %d pill(s)", name or "<image>", mode,
                     "n/a" if whole is None else f"{decision.single_confidence:.3f}", decision.mode_used,
                     decision.fallback_reason or "-", len(pills))
        result = {"image": name, "mode": mode, **decision.to_dict(), "num_pills": len(pills), "pills": pills,
                  "calibrated": self.calibration is not None, "hints": None if hints is None else hints.to_dict(),
                  "image_size": list(img.size), "elapsed_ms": round((time.perf_counter() - start) * 1000, 1)}
        self._log_hard_case(result, img, decision)
        return result

    def _log_hard_case(self, result: dict, image: Image.Image, decision: GatingDecision) -> None:
        hard = self.settings.hard_cases
        reasons = hard_case_reasons(decision, result["pills"], float(hard.single_confidence_below))
        result["hard_case"] = reasons
        if reasons and hard.enabled:
            try:
                self.hard_cases.write(result, reasons, image)
            except OSError as err:  # a full disk or a read-only folder loses the record, never the answer
                self._hard_case_failures.failed(f"hard case not logged ({err}): the answer is given; check that "
                                                "inference.hard_cases' folder can be written")
            else:
                self._hard_case_failures.passed()


_PREDICTORS: dict[tuple[str, str], Predictor] = {}


def get_predictor(exp_dir: str | Path | None = None, cfg: Any = None, device: str | None = None) -> Predictor:
    """A Predictor per (exp_dir, device), built once and reused (models load once per process)."""
    cfg = cfg if cfg is not None else _default_cfg(exp_dir)
    exp_dir = Path(exp_dir or cfg.paths.exp_dir).resolve()
    key = (str(exp_dir), str(resolve_device(device)))
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor(exp_dir, cfg, device)
    return _PREDICTORS[key]


def predict_pipeline(image: Any, mode: str | None = None, conf_threshold: float | None = None, *,
                     exp_dir: str | Path | None = None, predictor: Predictor | None = None, cfg: Any = None,
                     device: str | None = None) -> dict:
    """Predict one photo: dict with mode_used, gating fields (gating_score, single_confidence, fallback_reason)
    and `pills` (bbox [x, y, w, h], top-1 mapping_code/name/probability and `topk`). `mode` and `conf_threshold`
    default to the config's (inference.mode, inference.conf_threshold). Models come from `predictor`, or a cached
    Predictor for `exp_dir` (default: cfg.paths.exp_dir)."""
    predictor = predictor or get_predictor(exp_dir, cfg, device)
    return predictor.predict(image, mode=mode, conf_threshold=conf_threshold)
