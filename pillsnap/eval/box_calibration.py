"""The detector in calibration: the box check's calibration (pillsnap.infer.box_check), the detector's confidence
in each labelled pill of the validation combination photos, bound to the detector's weights by their hash and
stored in calibration.json; and the detector's boxes of those pills, where calibration cuts them as inference does
(pillsnap.eval.outputs.InferenceCrops)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pillsnap.eval.pipeline_eval import MATCH_IOU, photo_groups
from pillsnap.infer.preprocess import load_image
from pillsnap.metrics.detection import match_in_confidence_order
from pillsnap.utils.boxes import xywh_to_xyxy

LOGGER = logging.getLogger(__name__)
BOX_CHECK_PHOTOS = 500  # validation combination photos measured at most (about 4 pills each)
CONF_FLOOR = 0.01  # boxes kept: below any useful detection threshold, so that the threshold can change later


def box_confidences(detect: Callable[[Any, float], np.ndarray], photos: list[dict],
                    limit: int = BOX_CHECK_PHOTOS) -> dict:
    """The detector's confidences (`detect(image, floor)` -> [N, 5] xywh + confidence) on up to `limit` of the
    combination photos with every pill labelled: those of the boxes that hold a labelled pill (IoU MATCH_IOU,
    matched most confident first) and those of the others (boxes on no labelled pill, or a second box on one),
    each ascending."""
    pills, others, used, unreadable = [], [], 0, 0
    for photo in photos:
        if photo["image_type"] == "single" or photo["incomplete_gt"]:
            continue
        if used >= limit:
            break
        try:
            image, _ = load_image(photo["image_path"])
        except (OSError, ValueError) as err:  # one bad photo is skipped and counted, not the end of the check
            LOGGER.warning("calibration: box check: skipped %s (%s)", photo["image_path"], err)
            unreadable += 1
            continue
        dets = detect(image, CONF_FLOOR)
        found = set(match_in_confidence_order(xywh_to_xyxy(photo["boxes"]), xywh_to_xyxy(dets[:, :4]), dets[:, 4],
                                              MATCH_IOU).values())
        for d, confidence in enumerate(dets[:, 4]):
            (pills if d in found else others).append(round(float(confidence), 5))
        used += 1
    return {"photos": used, "unreadable_photos": unreadable, "match_iou": MATCH_IOU, "conf_floor": CONF_FLOOR,
            "pill_confidences": sorted(pills), "other_confidences": sorted(others)}


def validation_combinations(manifest: Any, limit: int, seed: int = 0) -> list[dict]:
    """Up to `limit` of the manifest's validation combination photos with every pill labelled, drawn at random
    (`seed`) and grouped as photo_groups groups them: the real data's validation split holds far more than are
    needed, and grouping all of them would cost minutes."""
    rows = manifest[(manifest["split"] == "val") & (manifest["image_type"] != "single")]
    if "incomplete_gt" in rows:
        rows = rows[~rows.groupby("image_path")["incomplete_gt"].transform("any").astype(bool)]
    paths = rows["image_path"].drop_duplicates()
    chosen = set(paths.sample(n=min(limit, len(paths)), random_state=seed)) if len(paths) else set()
    return photo_groups(rows[rows["image_path"].isin(chosen)], "val")


def detector_of(cfg: Any, exp_dir: str | Path, device: Any = None) -> Callable[[Any, float], np.ndarray] | None:
    """EXP's detector as inference runs it (`detect(image, conf_threshold)` -> [N, 5] xywh + confidence, with the
    inference settings' NMS), in torch and with no calibration applied; None without a detector checkpoint. The
    models are loaded at the first call, so a run with no photo to detect on loads nothing; an error building the
    predictor is raised there and again at every later call, one reading the detector's weights at each call
    (detector_boxes and calibrate_boxes each say what they lose and go on without it)."""
    from omegaconf import OmegaConf

    from pillsnap.infer.artefacts import find_checkpoints

    if find_checkpoints(exp_dir)[1] is None:
        return None
    run_cfg = OmegaConf.merge(cfg, {"inference": {"backend": "torch", "calibration": False,
                                                  "hard_cases": {"enabled": False}}})
    loaded: dict[str, Any] = {}

    def detect(image: Any, conf_threshold: float) -> np.ndarray:
        if "error" in loaded:
            raise loaded["error"]
        if "predictor" not in loaded:
            from pillsnap.infer.pipeline import Predictor

            try:
                loaded["predictor"] = Predictor(exp_dir, run_cfg, None if device is None else str(device))
            except (OSError, RuntimeError, ValueError) as err:
                loaded["error"] = err
                raise
        return loaded["predictor"].detect(image, conf_threshold)

    return detect


class LabelledPhotos:
    """`paths` decoded in order, in the frame their labels are in: (path, image, None), or (path, None, why) for a
    photo that cannot be read; by `workers` threads at most twice as many photos ahead of the one given (0: each
    when it is asked for). A full-size photo takes tens of milliseconds to decode, as long as the detector takes on
    it on a GPU, and PIL lets go of the GIL while it decodes. Threads rather than loader processes: a worker
    process that died (for memory) surfaced as an error wherever the pass happened to be, the detector's call
    among them."""

    def __init__(self, paths: list[str], workers: int) -> None:
        self.paths, self.workers = paths, max(0, int(workers))

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> tuple[str, Any, str | None]:
        from pillsnap.data.datasets import LABELLED
        from pillsnap.utils.images import DECODE_ERRORS, read_image

        path = self.paths[index]
        try:
            return path, read_image(path, LABELLED), None
        except DECODE_ERRORS as err:
            return path, None, str(err)

    def __iter__(self) -> Iterator[tuple[str, Any, str | None]]:
        if not self.workers:
            for index in range(len(self)):
                yield self.decode(index)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers, thread_name_prefix="pillsnap-decode") as pool:
            ahead: deque = deque()
            queued = 0
            try:
                while queued < len(self) or ahead:
                    while queued < len(self) and len(ahead) < 2 * self.workers:
                        ahead.append(pool.submit(self.decode, queued))
                        queued += 1
                    yield ahead.popleft().result()
            finally:  # the pass stopped early: the photos not started are not decoded
                for future in ahead:
                    future.cancel()


class _DetectorFailed(Exception):
    """The detector could not be loaded or run (the error is the cause)."""


def detector_boxes(detect: Callable[[Any, float], np.ndarray] | None, dataset: Any, sources: np.ndarray | None,
                   conf_threshold: float, workers: int = 0) -> tuple[dict[int, np.ndarray], dict | None]:
    """The detector's box of each pill of a combination photo in the crop data set `dataset` (its rows whose
    `sources` is "combination"): each photo, decoded in the frame its labels are in (by `workers` threads, 0: as
    it is needed), through `detect` at the inference threshold, and the boxes matched to the labelled ones as
    the pipeline's evaluation matches them (IoU MATCH_IOU, most confident first). Returns {row: [x, y, w, h]} and
    the counts: the pills, those at a detector box, those the detector missed and those on photos that could not be
    read (both stay at their labelled boxes). ({}, None) without a detector, such pills, or (said in the log) a
    detector that cannot be run."""
    from pillsnap.utils.logs import progress

    members: dict[str, list[int]] = {}
    if detect is not None and sources is not None and hasattr(dataset, "rows"):
        for row, (path, source) in enumerate(zip(dataset.rows.column("image_path"), sources, strict=True)):
            if source == "combination":
                members.setdefault(path, []).append(row)
    if not members:
        return {}, None
    boxes: dict[int, np.ndarray] = {}
    unreadable = 0
    try:
        for path, image, error in progress(LabelledPhotos(list(members), workers), "calibration: detector boxes",
                                           "photos", LOGGER):
            rows = members[path]
            if image is None:  # its pills stay at their labelled boxes (and fail there, if they do)
                LOGGER.warning("calibration: detector boxes: skipped %s (%s)", path, error)
                unreadable += len(rows)
                continue
            try:
                dets = detect(image, conf_threshold)
            except (OSError, RuntimeError, ValueError) as err:
                raise _DetectorFailed from err
            labelled = np.array([[r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h] for r in dataset.rows[rows]], float)
            found = match_in_confidence_order(xywh_to_xyxy(labelled), xywh_to_xyxy(dets[:, :4]), dets[:, 4],
                                              MATCH_IOU)
            boxes.update({rows[t]: dets[f, :4].astype(float) for t, f in found.items()})
    except _DetectorFailed as failed:
        err = failed.__cause__
        LOGGER.warning("calibration: combination pills are cut at their labelled boxes, not the detector's, which "
                       "cannot be run (%s: %s)", type(err).__name__, err)
        return {}, None
    pills = sum(map(len, members.values()))
    return boxes, {"pills": pills, "at_detector_boxes": len(boxes), "missed": pills - len(boxes) - unreadable,
                   "unreadable": unreadable, "match_iou": MATCH_IOU, "conf_threshold": conf_threshold}


def calibrate_boxes(cfg: Any, exp_dir: str | Path, manifest: Any, device: Any = None,
                    detect: Callable[[Any, float], np.ndarray] | None = None) -> dict | None:
    """The box check's calibration for EXP's detector (`detect`: detector_of's, loaded here by default) on the
    manifest's validation combination photos, with the detector's SHA-256. None without a detector or such
    photos, and (said in the log) when the detector or a photo cannot be read: the box check is then off, and the
    rest of the calibration is kept."""
    from pillsnap.infer.artefacts import find_checkpoints
    from pillsnap.infer.box_check import check_box_settings
    from pillsnap.utils.io import file_sha256

    check_box_settings(cfg.inference.get("box_check") or {})  # a wrong setting is the user's to fix, said as such
    detector = find_checkpoints(exp_dir)[1]
    photos = [] if manifest is None else validation_combinations(manifest, BOX_CHECK_PHOTOS, int(cfg.train.seed))
    if detector is None or not photos:
        return None
    detect = detect or detector_of(cfg, exp_dir, device)
    if detect is None:
        return None
    try:
        stored = box_confidences(detect, photos)
    except (OSError, RuntimeError, ValueError) as err:  # the detector cannot be loaded or run
        LOGGER.warning("calibration: the box check is not calibrated, so detector boxes are not checked for holding "
                       "a pill (%s: %s)", type(err).__name__, err)
        return None
    stored["detector_sha256"] = file_sha256(detector)
    LOGGER.info("calibration: detector confidences of %d labelled pills (and %d other boxes) on %d validation "
                "combination photos", len(stored["pill_confidences"]), len(stored["other_confidences"]),
                stored["photos"])
    return stored


def refresh_box_check(cfg: Any, exp_dir: str | Path, manifest: Any, device: Any = None) -> bool:
    """Calibrate the box check again into the classifier's stored calibration (and its report), the rest kept:
    for a detector trained or replaced after the classifier was calibrated. False when there is no calibration to
    add it to, or no box check could be calibrated."""
    from pillsnap.infer.artefacts import CALIBRATION_FILE
    from pillsnap.utils import read_json, save_json

    stored_path, report_path = (Path(exp_dir) / folder / CALIBRATION_FILE for folder in ("checkpoints", "reports"))
    if not stored_path.is_file():
        return False
    boxes = calibrate_boxes(cfg, exp_dir, manifest, device)
    if boxes is None:
        return False
    save_json(stored_path, {**read_json(stored_path), "box_check": boxes})
    summary = box_summary(boxes, cfg.inference)
    if report_path.is_file():
        save_json(report_path, {**read_json(report_path), "box_check": summary})
    LOGGER.info("calibration: %s", box_line(summary))
    return True


def box_summary(stored: dict, inference: Any) -> dict:
    """The box check as inference will apply it (inference.box_check.miss_rate at inference.conf_threshold), on
    the validation boxes themselves."""
    from pillsnap.infer.box_check import BoxCheck, describe

    check = BoxCheck.from_stored(stored, float(inference.box_check.miss_rate))
    return {"photos": stored["photos"], "detector_sha256": stored["detector_sha256"],
            **describe(check, float(inference.conf_threshold), stored["other_confidences"])}


def box_line(summary: dict) -> str:
    """The box check's calibration in one log line."""
    if summary["bound"] is None:
        return (f"box check: {summary['pills']} validation pills are too few for a miss rate of "
                f"{summary['miss_rate']:.0%}: no box is doubted")
    others = ("no other box at the detection threshold" if not summary["other_boxes"] else
              f"{summary['other_boxes_doubted']:.0%} of the {summary['other_boxes']} boxes on no labelled pill")
    return (f"box check: a box below detector confidence {summary['bound']:.3f} may hold no pill (from "
            f"{summary['pills']} validation pills at miss rate {summary['miss_rate']:.0%}); it doubts "
            f"{summary['pills_doubted']:.0%} of those pills and {others}")
