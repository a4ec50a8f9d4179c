"""How far a pill's features lie from every known drug: the "unknown pill" score.

One Gaussian per class with a covariance shared by all classes (Lee et al., NeurIPS 2018), fit on the classifier's
pre-logit features of training crops. The score is the squared Mahalanobis distance to the nearest class mean. A
softmax spreads probability over the known classes only, so a pill of a new colour or shape can still get a
confident known answer; its features, though, sit far from every class the model was trained on. The shared
covariance is shrunk towards a scaled identity (Ledoit-Wolf), which keeps it invertible with fewer crops than
feature dimensions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK_ROWS = 4096  # feature rows per block when fitting and scoring (bounds memory at thousands of classes)


def squared_distances(z: np.ndarray, means: np.ndarray, mean_norms: np.ndarray | None = None) -> np.ndarray:
    """Squared Euclidean distance of each whitened row of `z` [N, D'] to every mean [M, D']: [N, M]. `mean_norms`:
    the means' squared norms [M], when kept (ClassGaussians.mean_norms: 5,000 x 1,280 summed again at every call)."""
    norms = (means * means).sum(1) if mean_norms is None else mean_norms
    return np.maximum((z * z).sum(1, keepdims=True) - 2.0 * z @ means.T + norms[None], 0.0)


@dataclass(frozen=True)
class ClassGaussians:
    """Class means and the whitening of the shared covariance, kept in whitened space: `means` [M, D'] are the
    class means times `whiten` [D, D'], so a distance is one matrix product and a nearest-mean search. `classes`
    [M]: the class of each mean (a class with no crop to fit on has none); None: mean i is class i's."""

    means: np.ndarray
    whiten: np.ndarray
    classes: np.ndarray | None = None

    @functools.cached_property
    def mean_norms(self) -> np.ndarray:
        """The means' squared norms [M], once (squared_distances)."""
        return (self.means * self.means).sum(1)

    @property
    def class_ids(self) -> np.ndarray:
        """The class of each mean row."""
        return np.arange(len(self.means)) if self.classes is None else self.classes

    def knows_classes(self, num_classes: int) -> bool:
        """Whether each mean's class is known for a classifier of `num_classes`: a file from before `classes` was
        kept holds a mean per class present in its fit, so with fewer means than classes it cannot say which is
        which."""
        return self.classes is not None or len(self.means) == num_classes

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """The mean row of each class in `labels`; -1 for a class with no mean."""
        labels = np.asarray(labels, np.int64)
        ids = self.class_ids
        lookup = np.full(max(int(ids.max(initial=-1)), int(labels.max(initial=-1))) + 1, -1, np.int64)
        lookup[ids] = np.arange(len(ids))
        return lookup[labels] if len(labels) else np.zeros(0, np.int64)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, chunk: int = CHUNK_ROWS) -> ClassGaussians:
        """Fit on features [N, D] with class labels [N]: one mean per class present (`classes` says which), one
        shared covariance.

        Streams `features` in blocks of `chunk` rows and keeps only per-class sums and the D x D scatter of the
        residuals: at 5,000 classes the calibration fits on some 350,000 crops, where float64 copies of the whole
        array (and a per-class mask over all of it) cost gigabytes and minutes.
        """
        features, labels = np.asarray(features), np.asarray(labels)
        if len(features) < 2:
            raise ValueError(f"need at least two feature rows to fit class Gaussians, got {len(features)}")
        classes, index = np.unique(labels, return_inverse=True)
        means = _class_sums(features, index, len(classes), chunk) / np.bincount(index)[:, None]
        scatter, fourth = _residual_moments(features, index, means, chunk)
        covariance = _ledoit_wolf(scatter, fourth, len(features))
        # precision = W W^T with W = V diag(1/sqrt(eigval)), so (x - m)^T P (x - m) = |(x - m) W|^2
        eigval, eigvec = np.linalg.eigh(covariance)
        cutoff = eigval.max() * len(eigval) * np.finfo(np.float64).eps  # pinvh's: null directions weigh nothing
        whiten = eigvec * np.where(eigval > cutoff, 1.0 / np.sqrt(np.clip(eigval, cutoff, None)), 0.0)
        present = None if np.array_equal(classes, np.arange(len(classes))) else classes.astype(np.int64)
        return cls((means @ whiten).astype(np.float32), whiten.astype(np.float32), present)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of `features` [N, D] to every class mean: [N, C]."""
        return self.whitened_distances(np.asarray(features, np.float32) @ self.whiten)

    def whitened_distances(self, z: np.ndarray) -> np.ndarray:
        """Squared distance of each whitened row of `z` [N, D'] to every class mean: [N, C]."""
        return squared_distances(z, self.means, self.mean_norms)

    def score(self, features: np.ndarray, chunk: int = CHUNK_ROWS) -> np.ndarray:
        """Distance to the nearest known class, per row: larger is more likely an unknown pill. In blocks of `chunk`
        rows: the [N, C] distance matrix of a whole validation split is gigabytes at 5,000 classes."""
        features = np.asarray(features)
        out = np.empty(len(features), np.float32)
        for start in range(0, len(features), chunk):
            out[start:start + chunk] = self.distances(features[start:start + chunk]).min(axis=1)
        return out

    def save(self, path: str | Path) -> Path:
        from pillsnap.utils import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, means=self.means, whiten=self.whiten, classes=self.class_ids)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClassGaussians:
        with np.load(path) as data:  # files from before `classes` was kept: mean i is class i's (knows_classes)
            classes = np.asarray(data["classes"], np.int64) if "classes" in data.files else None
            means, whiten = data["means"], data["whiten"]
        if classes is not None and np.array_equal(classes, np.arange(len(means))):
            classes = None
        return cls(means, whiten, classes)


def _class_sums(features: np.ndarray, index: np.ndarray, n_classes: int, chunk: int) -> np.ndarray:
    """Per-class sums of the feature rows [C, D] in float64 (a sparse one-hot product per block of rows)."""
    from scipy import sparse

    sums = np.zeros((n_classes, features.shape[1]), np.float64)
    for start in range(0, len(features), chunk):
        rows = index[start:start + chunk]
        onehot = sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n_classes, len(rows)))
        sums += onehot @ features[start:start + chunk].astype(np.float64)
    return sums


def _residual_moments(features: np.ndarray, index: np.ndarray, means: np.ndarray,
                      chunk: int) -> tuple[np.ndarray, float]:
    """Scatter sum(r r^T) [D, D] and sum(|r|^4) of the residuals r = x - mean of x's class."""
    scatter, fourth = np.zeros((features.shape[1],) * 2, np.float64), 0.0
    for start in range(0, len(features), chunk):
        resid = features[start:start + chunk].astype(np.float64) - means[index[start:start + chunk]]
        scatter += resid.T @ resid
        fourth += float(((resid * resid).sum(1) ** 2).sum())
    return scatter, fourth


def _ledoit_wolf(scatter: np.ndarray, fourth: float, n: int) -> np.ndarray:
    """sklearn's LedoitWolf covariance (residuals are centred by construction), from the streamed moments."""
    p = scatter.shape[0]
    emp_cov = scatter / n
    mu = float(np.trace(emp_cov)) / p
    delta_ = float((emp_cov ** 2).sum())
    delta = (delta_ - 2.0 * mu * np.trace(emp_cov) + p * mu ** 2) / p
    beta = min((fourth / n - delta_) / (p * n), delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    shrunk = (1.0 - shrinkage) * emp_cov
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk


# The rules an "unknown pill" answer can follow. Each turns a crop's answer into a score where higher means more
# likely unknown; the threshold is a score.
UNKNOWN_RULES = {
    "feature_distance": "the pill's features lie farther from every known drug (squared Mahalanobis distance to the "
                        "nearest class mean) than the threshold: answered as an unknown pill",
    "probability": "one minus the top-1 calibrated probability is above the threshold (the probability is below "
                   "one minus it): answered as an unknown pill",
}


def check_unknown_rule(name: str) -> str:
    if name not in UNKNOWN_RULES:
        raise ValueError(f"unknown-pill rule must be one of {sorted(UNKNOWN_RULES)}, got {name!r}")
    return name


def unknown_scores(rule: str, probs: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
    """Per row, how unknown each answer looks under `rule` (higher: more likely not a known drug). `probs` [N, C]
    are calibrated probabilities; `distances` [N] the ClassGaussians scores (feature_distance needs them)."""
    if check_unknown_rule(rule) == "probability":
        return 1.0 - np.asarray(probs).max(axis=1)
    if distances is None:
        raise ValueError("the feature_distance rule needs feature distances")
    return np.asarray(distances, np.float64)


def rejection_threshold(scores: np.ndarray, correct: np.ndarray, keep_correct: float = 0.95) -> float:
    """The score above which an answer becomes "unknown pill": the level that keeps `keep_correct` of the
    validation answers that were right (chosen on known classes only, since unknowns are not in val). inf when
    nothing was right or keep_correct is 1 or more: nothing is rejected."""
    scores, correct = np.asarray(scores, np.float64), np.asarray(correct, bool)
    if not correct.any() or keep_correct >= 1.0:
        return float("inf")
    return float(np.quantile(scores[correct], keep_correct))


def rejection_report(known_scores: np.ndarray, known_correct: np.ndarray, unknown_scores: np.ndarray,
                     threshold: float) -> dict:
    """How a rule does on known classes and on classes held out of training: AUROC of unknown-vs-known by score,
    coverage and accuracy of the answered known photos, share of unknowns rejected."""
    from sklearn.metrics import roc_auc_score

    known, unknown = np.asarray(known_scores, np.float64), np.asarray(unknown_scores, np.float64)
    correct = np.asarray(known_correct, bool)
    answered = known <= threshold
    auroc = None
    if len(known) and len(unknown):
        auroc = float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown]))
    return {"auroc": auroc, "threshold": threshold, "known": int(len(known)), "unknown": int(len(unknown)),
            "coverage": float(answered.mean()) if len(answered) else 0.0,
            "accuracy_answered": float(correct[answered].mean()) if answered.any() else 0.0,
            "accuracy_all": float(correct.mean()) if len(correct) else 0.0,
            "unknown_rejected": float((unknown > threshold).mean()) if len(unknown) else None}
