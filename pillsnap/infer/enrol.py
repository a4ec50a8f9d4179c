"""Enrol a new drug from a few photos, remove one, list them: the checks, the crops and the features; the store
and how enrolled drugs are answered are in pillsnap.infer.enrolment.

Every check runs before anything is written, so a refused enrolment changes nothing: a malformed code or attribute,
a code that is a trained class or already enrolled (unless replace), too few or too many photos, a photo that
cannot be read or holds no pill, photos that look like an existing drug, and a drug that would answer more than
TAKEN_SHARE of the trained drugs' right validation answers as itself (both unless force).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pillsnap.infer.enrolment import (
    TAKEN_MIN_CROPS,
    TAKEN_SHARE,
    Enrolled,
    EnrolmentError,
    StaleEnrolment,
    class_map_entry,
    drug_spread,
    leave_one_out_distances,
    listed_codes,
    load_probe,
    read_store,
    refuses,
    store_lock,
    summary,
    taken_from_trained,
    trained_gaussians,
    write_store,
)
from pillsnap.infer.matching import check_hint_text, parse_colors, parse_shape
from pillsnap.infer.preprocess import crop_pill, load_image, locate_pill, pill_mask
from pillsnap.metrics.novelty import ClassGaussians
from pillsnap.utils import read_json

# The issue's range: fewer than 3 photos say too little about how a drug looks; past 10 a retraining is due.
MIN_PHOTOS, MAX_PHOTOS = 3, 10
# Photos look like an existing drug when more than this share of them lie nearer to it than to the drug's other
# photos: then neither can be told from the other, and enrolling would take answers from the existing drug.
LOOKALIKE_SHARE = 0.5
CODE_PATTERN = re.compile(r"K-\d{6}")
# A region of the pill mask counts as a pill when it holds at least this share of the largest region's pixels (and
# MIN_BLOB_PX on the 160 px working copy): specks and a shadow's fringe do not make a photo a combination.
BLOB_SHARE, MIN_BLOB_PX = 0.2, 12
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class DrugInfo:
    """What the user says about the new drug: its code and name, and optionally its imprints, colours and shape
    (label vocabulary: parse with `DrugInfo.parse`)."""

    code: str
    name: str
    print_front: str = ""
    print_back: str = ""
    colors: tuple[str, ...] = field(default_factory=tuple)
    shape: str | None = None

    @classmethod
    def parse(cls, code: str | None, name: str | None, imprint_front: str | None = None,
              imprint_back: str | None = None, color: str | None = None, shape: str | None = None) -> DrugInfo:
        """Checked and normalised; EnrolmentError names the bad field."""
        code, name = (code or "").strip(), " ".join((name or "").split())
        if not CODE_PATTERN.fullmatch(code):
            raise EnrolmentError(f"code {code!r} is not a drug code: K- followed by 6 digits, e.g. K-123456")
        if not name or len(name) > MAX_NAME_CHARS:
            raise EnrolmentError(f"name must be 1 to {MAX_NAME_CHARS} characters, got {len(name)}")
        try:
            for imprint in (imprint_front, imprint_back):
                check_hint_text(imprint, None, None)
            return cls(code, name, (imprint_front or "").strip(), (imprint_back or "").strip(), parse_colors(color),
                       parse_shape(shape))
        except ValueError as err:
            raise EnrolmentError(str(err)) from err

    def entry(self) -> dict:
        return class_map_entry(self.code, self.name, {"print_front": self.print_front, "print_back": self.print_back,
                                                      "colors": self.colors, "shape": self.shape})


@dataclass(frozen=True)
class Photo:
    """One photo to enrol from: a path / zip member / PIL image / array, and the name errors give it."""

    image: Any
    label: str


def as_photos(items: Sequence[Any]) -> list[Photo]:
    return [item if isinstance(item, Photo) else Photo(item, str(item)) for item in items]


def _features(predictor: Any, crops: Sequence[Image.Image]) -> np.ndarray:
    """The classifier's pre-logit features of the crops [N, D]."""
    features = predictor.forward(crops)[1]
    if features is None:
        raise EnrolmentError("this classifier gives no features (an ONNX export by an older PillSnap): enrol with "
                             "inference.backend=torch, or run pillsnap export again", "no_features")
    return features.float().cpu().numpy()


def _decode(photo: Photo) -> Image.Image:
    try:
        return load_image(photo.image)[0]
    except FileNotFoundError as err:
        raise EnrolmentError(f"photo {photo.label}: no such file", "bad_photo") from err
    except (OSError, ValueError) as err:  # the one decoder's errors: truncated, not an image, too large
        raise EnrolmentError(f"photo {photo.label} cannot be read as an image ({err})", "bad_photo") from err


def _blobs(image: Image.Image, work_px: int = 160) -> int:
    """How many things stand out from a plain backdrop: separate regions of the pill mask at least BLOB_SHARE of
    the largest (specks and shadows left out). Cheap: decides whether the detector is needed at all."""
    from scipy import ndimage

    small = image.copy()
    small.thumbnail((work_px, work_px))
    labels, count = ndimage.label(pill_mask(np.asarray(small)))
    if count == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= max(MIN_BLOB_PX, BLOB_SHARE * sizes.max())).sum())


def _pill_crop(predictor: Any, image: Image.Image, photo: Photo, nearest: Any) -> tuple[Image.Image, str]:
    """The pill of a photo: one pill standing out from a plain backdrop is cut like the training crops; otherwise
    the detector's pills, and of several (a combination photo) the one least like any known drug, refused when that
    is a box that may hold no pill (a dish's rim is unlike every drug too); where the detector finds none, whatever
    stands out from the backdrop."""
    box = locate_pill(image) if _blobs(image) == 1 else None
    if box is not None:
        return crop_pill(image, box, predictor.crop_margin), "located on the backdrop"
    threshold = float(predictor.settings.conf_threshold)
    dets = predictor.detect(image, threshold) if predictor.has_detector else np.zeros((0, 5))
    if len(dets) >= 2:
        crops = [crop_pill(image, d[:4], predictor.crop_margin) for d in dets]
        pick = int(np.argmax(nearest(_features(predictor, crops))[1]))
        check = predictor.box_check
        if check is not None and check.doubt(float(dets[pick, 4]), threshold):  # a dish's rim is unlike any drug too
            raise EnrolmentError(f"photo {photo.label}: what looks least like any known drug there may be no pill "
                                 f"(the detector is unsure of its box, confidence {dets[pick, 4]:.2f}); photograph "
                                 "the new drug on its own", "no_pill")
        return crops[pick], f"detected, {pick + 1} of {len(dets)} pills (the one least like any known drug)"
    if len(dets) == 1:
        return crop_pill(image, dets[0][:4], predictor.crop_margin), "detected"
    box = locate_pill(image)  # the detector saw no pill: what stands out, taken as one
    if box is not None:
        return crop_pill(image, box, predictor.crop_margin), "located on the backdrop (the detector found none)"
    raise EnrolmentError(f"photo {photo.label}: no pill found (one pill on a plain backdrop, or pills the detector "
                         "finds, are needed)", "no_pill")


class Neighbours:
    """The existing drugs (trained and enrolled, less the one being replaced) as whitened means, for "which
    existing drug is nearest" per feature row."""

    def __init__(self, gaussians: Any, enrolled: Enrolled, trained: list[str], skip: str) -> None:
        keep = [i for i, code in enumerate(enrolled.codes) if code != skip]
        means = [gaussians.means] + ([enrolled.means[keep] @ gaussians.whiten] if keep else [])
        n = np.asarray([enrolled.drugs[i]["n_photos"] for i in keep], np.float64)
        self.scale = np.concatenate([np.ones(len(gaussians.means)), 1.0 + 1.0 / n])
        self.space = ClassGaussians(np.concatenate(means).astype(np.float32), gaussians.whiten)
        # the trained drugs with a mean (one with no training crop has none), then the enrolled
        self.codes = [trained[c] for c in gaussians.class_ids] + [enrolled.codes[i] for i in keep]

    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index of the nearest existing drug, its distance) per row."""
        d = self.space.distances(features) / self.scale[None]
        return d.argmin(1), d.min(1)


def look_alike(own: np.ndarray, nearest: np.ndarray, nearest_index: np.ndarray, codes: Sequence[str],
               class_map: dict) -> dict | None:
    """The existing drug most of the photos lie nearer to than to the drug's other photos (`own`: leave-one-out
    distances; `nearest`: distance to the nearest existing drug), or None when the drug stands apart."""
    closer = nearest < own
    if closer.mean() <= LOOKALIKE_SHARE:
        return None
    index = int(np.bincount(nearest_index[closer]).argmax())
    rows = closer & (nearest_index == index)
    code = codes[index]
    return {"mapping_code": code, "name": (class_map.get(code) or {}).get("name", ""),
            "photos_nearer": int(rows.sum()), "photos": int(len(own)),
            "distance": round(float(np.median(nearest[rows])), 1), "own_distance": round(float(np.median(own)), 1)}


def _lookalike_message(found: dict) -> str:
    return (f"the photos look like {found['mapping_code']} ({found['name'] or 'no name'}): {found['photos_nearer']} "
            f"of {found['photos']} lie nearer to it (distance {found['distance']:.0f}) than to this drug's other "
            f"photos ({found['own_distance']:.0f}); check the code and the photos, or enrol anyway with --force")


def check_photo_count(n: int) -> None:
    """EnrolmentError ("photo_count") unless `n` photos are enough and not too many: asked before any photo is
    decoded, so that hundreds given by mistake are refused at once, not after decoding them all."""
    if not MIN_PHOTOS <= n <= MAX_PHOTOS:
        raise EnrolmentError(f"{n} photo(s) given: enrolling needs {MIN_PHOTOS} to {MAX_PHOTOS} photos of the drug",
                             "photo_count")


def _check_request(predictor: Any, info: DrugInfo, photos: list[Photo]) -> tuple[Any, float | None]:
    """The checks that need no store: photo count, a trained code, a calibration to place the drug in. Returns
    the trained class Gaussians and the feature-distance threshold."""
    check_photo_count(len(photos))
    trained_names, trained_map = predictor.trained[0], predictor.trained[1]
    if info.code in trained_names:
        raise EnrolmentError(f"{info.code} is a trained class ({trained_map[info.code].get('name', '')}): it is "
                             "answered already", "trained_class")
    ckpt_dir = predictor.exp_dir / "checkpoints"
    gaussians, threshold = trained_gaussians(ckpt_dir, predictor.calibration)
    if gaussians is None:
        raise EnrolmentError(f"{ckpt_dir} has no calibration with class Gaussians for this classifier: enrolled "
                             "drugs are placed among them (pillsnap calibrate --exp EXP)", "not_calibrated")
    if not gaussians.knows_classes(len(trained_names)):
        raise EnrolmentError(f"{ckpt_dir}: the class Gaussians hold {len(gaussians.means)} means for "
                             f"{len(trained_names)} trained drugs and do not say which drug each is (a file from an "
                             "older PillSnap, fit with a drug that had no training crop): recalibrate "
                             "(pillsnap calibrate --exp EXP)", "not_calibrated")
    return gaussians, threshold


def _check_code(existing: Enrolled, code: str, replace: bool) -> int | None:
    """The code's place in the store (None: new); EnrolmentError when it is enrolled and not to be replaced."""
    index = existing.find(code)
    if index is not None and not replace:
        drug = existing.drugs[index]
        raise EnrolmentError(f"{code} is already enrolled ({drug['name']}, {drug.get('enrolled_at', '')}): add "
                             "--replace to enrol it again from these photos", "already_enrolled")
    return index


def _measure(predictor: Any, images: list[Image.Image], photos: list[Photo], neighbours: Neighbours,
             gaussians: Any) -> tuple[np.ndarray, np.ndarray, dict | None, list[str]]:
    """(features [N, D], whitened features, the existing drug the photos look like or None, how each pill was
    found)."""
    crops = [_pill_crop(predictor, image, photo, neighbours) for image, photo in zip(images, photos, strict=True)]
    features = _features(predictor, [crop for crop, _ in crops])
    whitened = features @ gaussians.whiten
    own = leave_one_out_distances(whitened) / (1.0 + 1.0 / (len(photos) - 1))
    nearest_index, nearest = neighbours(features)
    found = look_alike(own, nearest, nearest_index, neighbours.codes, predictor.class_map)
    return features, whitened, found, [how for _, how in crops]


def enrol(predictor: Any, info: DrugInfo, photos: Sequence[Any], replace: bool = False,
          force: bool = False) -> dict:
    """Enrol `info`'s drug from `photos` into the predictor's experiment; the predictor answers it at once (and any
    other predictor of the experiment on its next photo). Returns what was done; EnrolmentError, with nothing
    changed, for every bad input."""
    start = time.perf_counter()
    photos = as_photos(photos)
    gaussians, threshold = _check_request(predictor, info, photos)
    images = [_decode(photo) for photo in photos]  # every photo readable before any work on one
    ckpt_dir = predictor.exp_dir / "checkpoints"
    with store_lock(ckpt_dir):
        existing = read_store(ckpt_dir, predictor.classifier_path, predictor.classifier_sha256)
        index = _check_code(existing, info.code, replace)
        neighbours = Neighbours(gaussians, existing, predictor.trained[0], info.code)
        features, whitened, found, found_by = _measure(predictor, images, photos, neighbours, gaussians)
        if found and not force:
            raise EnrolmentError(_lookalike_message(found), "look_alike")
        entry = {**info.entry(), "n_photos": len(photos), "spread": round(drug_spread(whitened, threshold), 4),
                 "photos": [p.label for p in photos],
                 "enrolled_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        after = existing.with_drug(entry, features.mean(0))
        takes = takes_known(predictor, gaussians, existing.without(info.code), after, info.code, threshold)
        if takes.get("refused") and not force:
            raise EnrolmentError(_takes_message(info.code, takes), "takes_known")
        write_store(ckpt_dir, predictor.classifier_sha256, after)
    predictor.refresh_enrolment()
    return {"mapping_code": info.code, "name": info.name, "n_photos": len(photos), "replaced": index is not None,
            "look_alike": found, "takes_known": takes,
            "crops": [{"photo": p.label, "pill": how} for p, how in zip(photos, found_by, strict=True)],
            "elapsed_s": round(time.perf_counter() - start, 2)}


def takes_known(predictor: Any, gaussians: Any, before: Enrolled, after: Enrolled, code: str,
                threshold: float | None) -> dict:
    """What enrolling `code` would take from the trained drugs, on the calibration's validation probe: how many of
    its crops answered right now (`of`) it would answer as the new drug by their look (`crops`, `share`), the drug
    it takes most from (`mapping_code`, `name`, `drug_crops` of `drug_of`) and whether that is too much (`refused`,
    enrolment.refuses); `measured: false` with `why` when there is no probe to measure on."""
    probe, why = load_probe(predictor.exp_dir / "checkpoints", predictor.calibration)
    if probe is None or not len(probe.labels):
        return {"measured": False, "why": why or "the probe is empty"}
    taken = taken_from_trained(probe, gaussians, before, after, code, threshold)
    right = int(probe.right.sum())
    out = {"measured": True, "crops": int(taken.sum()), "of": right,
           "share": round(float(taken.sum()) / max(right, 1), 4), "refused": refuses(taken, probe)}
    if taken.any():
        index = int(np.bincount(probe.labels[taken]).argmax())
        drug = predictor.trained[0][index] if index < len(predictor.trained[0]) else f"class {index}"
        out.update(mapping_code=drug, name=(predictor.trained[1].get(drug) or {}).get("name", ""),
                   drug_crops=int((taken & (probe.labels == index)).sum()),
                   drug_of=int((probe.right & (probe.labels == index)).sum()))
    return out


def _takes_message(code: str, takes: dict) -> str:
    return (f"enrolling {code} would take answers from the trained drugs: {takes['crops']} of the {takes['of']} "
            f"validation pills they answer right ({takes['share']:.1%}) would be answered as {code} by their look, "
            f"most of them ({takes['drug_crops']} of {takes['drug_of']}) of {takes['mapping_code']} "
            f"({takes['name'] or 'no name'}); {TAKEN_MIN_CROPS} or more taken that are a quarter of one drug's or "
            f"{TAKEN_SHARE:.0%} of all is too many: check the photos and the code, or enrol anyway with --force")




def stored_sha(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / "enrolment.json"
    return read_json(path).get("classifier_sha256") if path.is_file() else None


def remove(exp_dir: str | Path, code: str, classifier: str | Path | None = None,
           classifier_sha: str | None = None) -> dict:
    """Remove an enrolled drug (from a stale store too: that is how one is cleared). EnrolmentError when `code` is
    not enrolled. A running predictor stops answering it on its next photo. `classifier_sha`: the classifier file's
    SHA-256 where the caller holds it (a served predictor does: the checkpoint is not hashed again)."""
    from pillsnap.infer.artefacts import find_checkpoints

    ckpt_dir = Path(exp_dir) / "checkpoints"
    classifier = classifier or find_checkpoints(exp_dir)[0]
    with store_lock(ckpt_dir):
        try:
            enrolled, sha = read_store(ckpt_dir, classifier, classifier_sha), classifier_sha
        except StaleEnrolment:
            sha = stored_sha(ckpt_dir)
            enrolled = read_store(ckpt_dir, classifier, sha)
        index = enrolled.find(code)
        if index is None:
            raise EnrolmentError(f"{code} is not enrolled (enrolled: {listed_codes(enrolled.codes)})", "not_enrolled")
        if sha is None:
            from pillsnap.utils.io import file_sha256

            sha = file_sha256(classifier)
        write_store(ckpt_dir, sha, enrolled.without(code))
    return {"removed": code, "name": enrolled.drugs[index]["name"]}


def listing(exp_dir: str | Path, classifier: str | Path | None = None, classifier_sha: str | None = None) -> dict:
    """The enrolled drugs (`drugs`) and, when the store was made for other weights, `stale` with the reason (its
    drugs are listed but not answered). `classifier_sha`: as remove's."""
    from pillsnap.infer.artefacts import find_checkpoints

    ckpt_dir = Path(exp_dir) / "checkpoints"
    classifier = classifier or find_checkpoints(exp_dir)[0]
    try:
        return {"drugs": summary(read_store(ckpt_dir, classifier, classifier_sha).drugs), "stale": None}
    except StaleEnrolment as err:
        return {"drugs": summary(read_store(ckpt_dir, classifier, stored_sha(ckpt_dir)).drugs), "stale": str(err)}
