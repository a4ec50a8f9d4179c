"""Drugs enrolled after training, from a few photos: their stored form and how inference answers them.

An enrolled drug is one more class mean in the space of the unknown-pill rule's class Gaussians
(pillsnap.metrics.novelty.ClassGaussians: the classifier's pre-logit features, whitened by the shared covariance).
A crop's squared distances to the trained and the enrolled means give the enrolled drugs a probability (a Gaussian
discriminant posterior); the classifier's own probabilities of the trained drugs are scaled down by what the
enrolled drugs take, so the top-k stays one distribution. The unknown-pill score becomes the distance to the
nearest trained or enrolled mean, and the drug's class-map entry joins the imprint evidence and the hints.

The store, in the experiment's checkpoints/ beside the classifier it was made for:
  1. the means are written to a new `enrolment_features-<hash>.npz` (atomically);
  2. `enrolment.json` is replaced atomically, naming that file, its SHA-256 and the classifier's SHA-256: this is
     the commit point, so a kill before it leaves the previous enrolments whole;
  3. feature files no longer named are deleted.
Writers hold `enrolment.lock` for the whole read-modify-write, so the server and the CLI never lose each other's
drugs. A store made for other classifier weights is stale: inference skips it (said in the log) and the enrol
command refuses to add to it until its drugs are removed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pillsnap.metrics.novelty import ClassGaussians, squared_distances
from pillsnap.utils import atomic_path, read_json, save_json
from pillsnap.utils.io import file_sha256, prune_hashed, read_hashed, write_hashed
from pillsnap.utils.locks import file_lock

LOGGER = logging.getLogger(__name__)
ENROLMENT_FILE = "enrolment.json"
FEATURES_PREFIX = "enrolment_features-"
LOCK_FILE = "enrolment.lock"
STORE_VERSION = 1
# Softness of the enrolled drugs' posterior, as a share of the unknown-pill threshold (a squared distance): the
# discriminant's own exp(-d/2) gives 0 or 1 at the distances these features have, which is sure of itself even
# when wrong; a softness near the threshold itself spreads probability over drugs that are plainly not it.
# bench/enrol_bench.py prints the answers' mean probability beside their accuracy.
POSTERIOR_SOFTNESS = 0.02
# A drug's photos spread like the trained drugs' right answers when their leave-one-out distances average this
# share of the threshold; a drug whose photos spread more (a two-tone capsule, a shiny coating) has its distances
# scaled down by how much more, for the unknown-pill score only (ranking uses the plain distance).
SPREAD_REFERENCE = 0.5


class EnrolmentError(ValueError):
    """Bad input to an enrolment, or a stale store: the message names the problem and the fix; nothing changed.
    `kind` says which (the API's error code): bad_field, photo_count, bad_photo, no_pill, trained_class,
    already_enrolled, look_alike, takes_known, not_enrolled, stale, not_calibrated, no_features, store_broken."""

    def __init__(self, message: str, kind: str = "bad_field") -> None:
        super().__init__(message)
        self.kind = kind


class StaleEnrolment(EnrolmentError):
    """The store was made for other classifier weights."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "stale")


def listed_codes(codes: Sequence[str], shown: int = 10) -> str:
    """Enrolled codes for a message: the first `shown` and how many in all (a log line, an error or a 404 body
    that named each of thousands of enrolled drugs ran to tens of kilobytes)."""
    codes = list(codes)
    if not codes:
        return "none"
    head = ", ".join(codes[:shown])
    return head if len(codes) <= shown else f"{head}, ... ({len(codes):,} in all)"


@dataclass(frozen=True)
class Enrolled:
    """The enrolled drugs as stored: class-map entries (with `n_photos`, `spread`, `photos`) and their raw feature
    means [E, D] (the classifier's pre-logit features, not whitened: a recalibration of the same weights keeps them
    usable; `spread` stays the one measured against the calibration of the day)."""

    drugs: tuple[dict, ...] = ()
    means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def codes(self) -> list[str]:
        return [d["mapping_code"] for d in self.drugs]

    def find(self, code: str) -> int | None:
        return next((i for i, d in enumerate(self.drugs) if d["mapping_code"] == code), None)

    def with_drug(self, entry: dict, mean: np.ndarray) -> Enrolled:
        """A copy with `entry` added, or replacing the drug of the same code."""
        index = self.find(entry["mapping_code"])
        rows = list(self.means) if len(self.drugs) else []
        drugs = list(self.drugs)
        if index is None:
            drugs.append(entry)
            rows.append(mean)
        else:
            drugs[index], rows[index] = entry, mean
        return Enrolled(tuple(drugs), np.asarray(rows, np.float32))

    def without(self, code: str) -> Enrolled:
        keep = [i for i, d in enumerate(self.drugs) if d["mapping_code"] != code]
        means = self.means[keep] if keep else np.zeros((0, self.means.shape[-1]), np.float32)
        return Enrolled(tuple(self.drugs[i] for i in keep), means)


# ---- the store --------------------------------------------------------------------------------------------------

def store_stamp(ckpt_dir: str | Path) -> tuple[int, int, int] | None:
    """What changes whenever the store is committed (enrolment.json replaced): None when there is none."""
    try:
        st = os.stat(Path(ckpt_dir) / ENROLMENT_FILE)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _stored(path: Path) -> dict:
    """enrolment.json's content, checked for the shape this module writes; EnrolmentError ("store_broken") naming
    the problem when it is not (a truncated or hand-edited file): inference then answers without enrolled drugs,
    and the file is left as it is for its owner to mend or remove."""
    try:
        stored = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise EnrolmentError(f"{path} cannot be read ({err}): mend it, or remove it and enrol the drugs again",
                             "store_broken") from err
    drugs = stored.get("drugs") if isinstance(stored, dict) else None
    if not isinstance(drugs, list) or not all(_sound_entry(d) for d in drugs):
        raise EnrolmentError(f"{path} is not an enrolment store (an object whose 'drugs' list gives each drug's "
                             "mapping_code, name and n_photos): mend it, or remove it and enrol the drugs again",
                             "store_broken")
    return stored


def _sound_entry(drug: object) -> bool:
    """Whether a stored drug has the fields answers and listings read without a default."""
    return (isinstance(drug, dict) and isinstance(drug.get("mapping_code"), str) and isinstance(drug.get("name"), str)
            and type(drug.get("n_photos")) is int and drug["n_photos"] > 0
            and ("spread" not in drug or type(drug["spread"]) in (int, float)))


def read_store(ckpt_dir: str | Path, classifier: str | Path, classifier_sha: str | None = None) -> Enrolled:
    """The enrolled drugs of `classifier` (none when there is no store). StaleEnrolment when the store was made for
    other weights; EnrolmentError when its feature file is missing or not the one it names."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / ENROLMENT_FILE
    if not path.is_file():
        return Enrolled()
    stored = _stored(path)
    codes = listed_codes([d["mapping_code"] for d in stored["drugs"]])
    if stored.get("classifier_sha256") != (classifier_sha or file_sha256(classifier)):
        raise StaleEnrolment(f"{path} was made for other classifier weights (the model was retrained since): its "
                             f"drugs ({codes}) are not answered; enrol them again from their photos after removing "
                             f"them (pillsnap enrol --exp EXP --remove CODE)")
    features = ckpt_dir / str(stored.get("features_file", ""))
    if not stored.get("drugs"):
        return Enrolled()

    def load(file: Path) -> tuple[np.ndarray, list[str]]:
        with np.load(file) as data:
            return np.asarray(data["means"], np.float32), [str(c) for c in data["codes"]]

    loaded, problem = read_hashed(features, stored.get("features_sha256"), load)
    if problem is not None:
        raise EnrolmentError(f"{features} is missing or not the file {path} names: remove {path} and enrol again",
                             "store_broken")
    means, codes_stored = loaded
    if codes_stored != [d["mapping_code"] for d in stored["drugs"]]:
        raise EnrolmentError(f"{features} and {path} list different drugs: remove {path} and enrol again",
                             "store_broken")
    return Enrolled(tuple(stored["drugs"]), means)


def write_store(ckpt_dir: str | Path, classifier_sha: str, enrolled: Enrolled) -> Path:
    """Commit `enrolled` (the protocol at the top of this module); returns enrolment.json's path."""
    ckpt_dir = Path(ckpt_dir)

    def write(path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, codes=np.asarray(enrolled.codes, dtype=str), means=enrolled.means)

    features, digest = write_hashed(ckpt_dir, FEATURES_PREFIX, ".npz", write)
    save_json(ckpt_dir / ENROLMENT_FILE, {"version": STORE_VERSION, "classifier_sha256": classifier_sha,
                                          "features_file": features.name, "features_sha256": digest,
                                          "drugs": list(enrolled.drugs)})
    prune_hashed(ckpt_dir, FEATURES_PREFIX, ".npz", [features])  # after the commit: files no store names any more
    return ckpt_dir / ENROLMENT_FILE


@contextmanager
def store_lock(ckpt_dir: str | Path) -> Iterator[None]:
    """Hold the store's lock for a read-modify-write, waiting for another writer to finish."""
    with file_lock(Path(ckpt_dir) / LOCK_FILE, wait=True):
        yield


# ---- answering -------------------------------------------------------------------------------------------------

def leave_one_out_distances(whitened: np.ndarray) -> np.ndarray:
    """Each whitened feature row's squared distance to the mean of the other rows [N] (N >= 2)."""
    n = len(whitened)
    others = (whitened.sum(0, keepdims=True) - whitened) / (n - 1)
    return ((whitened - others) ** 2).sum(1)


def drug_spread(whitened: np.ndarray, threshold: float | None) -> float:
    """How much wider than a trained drug's right answers this drug's photos spread (>= 1): the unknown-pill score
    divides its distances by it. 1 without a threshold (no unknown answers to scale)."""
    if threshold is None or len(whitened) < 2:
        return 1.0
    return max(1.0, float(leave_one_out_distances(whitened).mean()) / (SPREAD_REFERENCE * threshold))


@dataclass(frozen=True)
class EnrolledSpace:
    """The trained class Gaussians with the enrolled drugs' means added: what classify needs to answer them."""

    gaussians: ClassGaussians  # the trained classes, from the calibration
    codes: tuple[str, ...]
    means: np.ndarray  # [E, D'] whitened
    n_photos: np.ndarray  # [E]
    spread: np.ndarray  # [E]
    softness: float  # the posterior's temperature, a squared distance

    @classmethod
    def build(cls, gaussians: ClassGaussians, enrolled: Enrolled, threshold: float | None) -> EnrolledSpace:
        n = np.asarray([d["n_photos"] for d in enrolled.drugs], np.float64)
        spread = np.asarray([float(d.get("spread", 1.0)) for d in enrolled.drugs], np.float64)
        softness = POSTERIOR_SOFTNESS * (threshold if threshold else 1.0 / POSTERIOR_SOFTNESS)
        return cls(gaussians, tuple(enrolled.codes), (enrolled.means @ gaussians.whiten).astype(np.float32), n,
                   spread, float(softness))

    def distances(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(trained [N, C], enrolled [N, E]) squared distances of raw features (enrolled_distances)."""
        z = np.asarray(features, np.float32) @ self.gaussians.whiten
        return self.gaussians.whitened_distances(z), self.enrolled_distances(z)

    def enrolled_distances(self, z: np.ndarray, which: slice = slice(None)) -> np.ndarray:
        """[N, E] squared distances of whitened rows to the enrolled means (those of `which`), each divided by
        1 + 1/n, the extra spread of a mean estimated from n photos, so that a far trained mean and a near enrolled
        one compare fairly."""
        return squared_distances(z, self.means[which]) / (1.0 + 1.0 / self.n_photos[which])[None]

    def merge(self, probs: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, C+E], unknown-pill distances [N]) from the classifier's calibrated probabilities
        [N, C] and the crops' features [N, D]."""
        trained, enrolled = self.distances(features)
        return merge_posterior(probs, trained, enrolled, self.softness), np.minimum(
            trained.min(1), (enrolled / self.spread[None]).min(1))


def enrolled_posterior(trained: np.ndarray, enrolled: np.ndarray, softness: float) -> np.ndarray:
    """[N, E]: each enrolled drug's probability, its share of the discriminant posterior softmax(-d / (2 softness))
    over the trained and enrolled means (squared distances [N, C] and [N, E])."""
    logits = -np.concatenate([trained, enrolled], 1).astype(np.float64) / (2.0 * softness)
    logits -= logits.max(1, keepdims=True)
    q = np.exp(logits)
    q /= q.sum(1, keepdims=True)
    return q[:, trained.shape[1]:]


def merge_posterior(probs: np.ndarray, trained: np.ndarray, enrolled: np.ndarray, softness: float) -> np.ndarray:
    """[N, C+E]: the enrolled drugs' probabilities (enrolled_posterior); the classifier's probabilities of the
    trained drugs share what is left."""
    q_enrolled = enrolled_posterior(trained, enrolled, softness)
    rest = 1.0 - q_enrolled.sum(1, keepdims=True)
    return np.concatenate([np.asarray(probs, np.float64) * rest, q_enrolled], 1).astype(np.float32)


# ---- what an enrolment would cost the trained drugs ---------------------------------------------------------------

# in checkpoints/, as validation_probe-<hash>.npz, named in calibration.json (PROBE_FILE: older calibrations' name)
PROBE_PREFIX = "validation_probe-"
PROBE_FILE = "validation_probe.npz"
# Validation crops kept per trained drug: all of them up to PROBE_CROPS in all, at least PROBE_MIN_PER_DRUG each
# (at 5,000 drugs: 5 each, 64 MB of EfficientNetV2-S features as float16). With 5, a drug that takes a third of one
# trained drug's pills is refused about half the time (2 or more of its 5 taken), one that takes them all always.
PROBE_CROPS, PROBE_MIN_PER_DRUG = 25_000, 5
# An enrolment is refused (unless forced) when it would answer at least TAKEN_MIN_CROPS of the trained drugs'
# right probe crops as itself and those are a quarter of one drug's, or 1 % of all: what a drug added without
# retraining may cost the drugs the classifier was trained on.
TAKEN_MIN_CROPS, TAKEN_DRUG_SHARE, TAKEN_SHARE = 2, 0.25, 0.01
# Probe crops farther from the new drug's mean than from their own drug's by more than this many softnesses (2 x
# ln 1e6) keep under a millionth of their probability for it: only the others are measured exactly.
CANDIDATE_MARGIN = 2.0 * 13.8


@dataclass(frozen=True)
class Probe:
    """Validation crops of the trained drugs, cut as inference cuts them (a single-pill photo where its pill is
    located, a combination photo's pill at its box): their whitened features [N, D'] (the calibration's class
    Gaussians' space), their drug's index, the calibrated probability of the classifier's top drug and whether that
    drug is the right one. What an enrolment would take from the trained drugs is measured on them."""

    whitened: np.ndarray
    labels: np.ndarray
    top: np.ndarray
    right: np.ndarray

    def save(self, path: str | Path) -> Path:
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, whitened=self.whitened.astype(np.float16), labels=self.labels, top=self.top,
                     right=self.right)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        with np.load(path) as data:
            return cls(data["whitened"].astype(np.float32), data["labels"], data["top"], data["right"].astype(bool))


def probe_rows(labels: np.ndarray, seed: int, total: int = PROBE_CROPS,
               minimum: int = PROBE_MIN_PER_DRUG) -> np.ndarray:
    """Sorted positions of the probe's crops among validation `labels`: up to max(minimum, total // drugs) of each
    drug, drawn at random with `seed`."""
    drugs = np.unique(labels)
    per_drug = max(minimum, total // max(len(drugs), 1))
    order = np.random.default_rng(seed).permutation(len(labels))
    counts: dict[int, int] = {}
    keep = []
    for index in order:
        label = int(labels[index])
        if counts.get(label, 0) < per_drug:
            counts[label] = counts.get(label, 0) + 1
            keep.append(index)
    return np.sort(np.asarray(keep, np.int64))


def load_probe(ckpt_dir: str | Path, calibration: Mapping | None) -> tuple[Probe | None, str | None]:
    """(the probe the calibration wrote, None), or (None, why not): a calibration from before it, or a file that is
    missing or not the one the calibration names."""
    name = (calibration or {}).get("validation_probe_file")
    if not name:
        return None, "the calibration has no probe (made before it, or from a data set without photos)"
    path = Path(ckpt_dir) / str(name)
    try:
        probe, problem = read_hashed(path, calibration.get("validation_probe_sha256"), Probe.load)
    except (KeyError, ValueError, OSError) as err:  # an older probe's layout: recalibrating writes this one's
        return None, f"{path} cannot be read as a probe ({err}): recalibrate (pillsnap calibrate --exp EXP)"
    return (probe, None) if problem is None else (None, f"{path} is missing or not the file the calibration names")


def taken_from_trained(probe: Probe, gaussians: ClassGaussians, before: Enrolled, after: Enrolled, code: str,
                       threshold: float | None) -> np.ndarray:
    """[N] bool: the probe's crops answered right by the trained classifier with the `before` enrolments that the
    `after` enrolments would answer as `code` instead, by their look (the imprint is not read here): the new drug
    takes more probability than the classifier's top drug keeps, and more than any other enrolled drug (as
    EnrolledSpace.merge gives it). Only the crops not far nearer their own drug than the new one are measured."""
    space, index = EnrolledSpace.build(gaussians, after, threshold), after.find(code)
    # the new drug's column alone: every enrolled drug's over the whole probe took seconds with thousands enrolled
    d_new = space.enrolled_distances(probe.whitened, slice(index, index + 1))[:, 0]
    own = gaussians.rows_of(probe.labels)  # a drug with no training crop has no mean: every crop of it is measured
    d_own = np.full(len(own), np.inf)
    d_own[own >= 0] = ((probe.whitened[own >= 0] - gaussians.means[own[own >= 0]]) ** 2).sum(1)
    rows = np.flatnonzero(probe.right & (d_new - d_own < CANDIDATE_MARGIN * space.softness))
    taken = np.zeros(len(probe.labels), bool)
    if not len(rows):
        return taken
    z, top = probe.whitened[rows], probe.top[rows]
    right = np.ones(len(rows), bool)
    trained = gaussians.whitened_distances(z)  # once, for the enrolments before and after
    if before.drugs:
        prior = EnrolledSpace.build(gaussians, before, threshold)
        q = enrolled_posterior(trained, prior.enrolled_distances(z), prior.softness)
        right = top * (1.0 - q.sum(1)) >= q.max(1)
    q = enrolled_posterior(trained, space.enrolled_distances(z), space.softness)
    new = q[:, index]
    taken[rows] = right & (new > top * (1.0 - q.sum(1))) & (new >= q.max(1))
    return taken


def refuses(taken: np.ndarray, probe: Probe) -> bool:
    """Whether what an enrolment takes (taken_from_trained) is too much: at least TAKEN_MIN_CROPS crops, and a
    quarter of one trained drug's right probe crops or 1 % of all of them."""
    if taken.sum() < TAKEN_MIN_CROPS:
        return False
    if taken.sum() > TAKEN_SHARE * max(int(probe.right.sum()), 1):
        return True
    lost = np.bincount(probe.labels[taken], minlength=int(probe.labels.max()) + 1)
    held = np.bincount(probe.labels[probe.right], minlength=len(lost))
    return bool(((lost >= TAKEN_MIN_CROPS) & (lost >= TAKEN_DRUG_SHARE * np.maximum(held, 1))).any())


def class_map_entry(code: str, name: str, attrs: Mapping[str, object]) -> dict:
    """An enrolled drug's class-map entry, in class_map.json's fields (what the evidence and hints read)."""
    return {"mapping_code": code, "name": name, "name_en": "", "company": "", "edi_codes": [],
            "shape": attrs.get("shape") or "", "colors": list(attrs.get("colors") or ()),
            "print_front": attrs.get("print_front") or "", "print_back": attrs.get("print_back") or "",
            "line_front": "", "line_back": "", "form": "", "enrolled": True}


def summary(drugs: Sequence[Mapping]) -> list[dict]:
    """The list the CLI and the API show: code, name, imprints, colours, shape, photos, when."""
    keys = ("mapping_code", "name", "print_front", "print_back", "colors", "shape", "n_photos", "enrolled_at")
    return [{k: d.get(k) for k in keys} for d in drugs]



def trained_gaussians(ckpt_dir: str | Path, calibration: Mapping | None) -> tuple[ClassGaussians | None, float | None]:
    """(the trained class Gaussians, the feature-distance threshold) of a loaded calibration, whatever rule is in
    force; (None, None) without a calibration or when its feature file is missing or not the one it names."""
    from pillsnap.infer.artefacts import load_class_gaussians

    if calibration is None:
        return None, None
    gaussians, _, problem = load_class_gaussians(ckpt_dir, calibration)
    if problem:
        return None, None
    threshold = (calibration.get("unknown_thresholds") or {}).get("feature_distance")
    return gaussians, None if threshold is None else float(threshold)


def load_space(ckpt_dir: str | Path, classifier: str | Path, calibration: Mapping | None,
               classifier_sha: str | None = None) -> tuple[EnrolledSpace | None, tuple[dict, ...]]:
    """What inference answers enrolled drugs with, and their entries; (None, ()) when none are enrolled, or (said
    in the log) the store is stale or the run has no class Gaussians to place them among."""
    try:
        enrolled = read_store(ckpt_dir, classifier, classifier_sha)
    except EnrolmentError as err:
        LOGGER.warning("%s", err)
        return None, ()
    if not enrolled.drugs:
        return None, ()
    gaussians, threshold = trained_gaussians(ckpt_dir, calibration)
    if gaussians is None:
        LOGGER.warning("%d enrolled drug(s) in %s are not answered: they need the calibration's class Gaussians "
                       "(pillsnap calibrate --exp EXP)", len(enrolled.drugs), ckpt_dir)
        return None, ()
    return EnrolledSpace.build(gaussians, enrolled, threshold), enrolled.drugs
