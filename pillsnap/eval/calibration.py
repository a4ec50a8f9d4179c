"""Calibrating a trained classifier at the end of training: fit the temperature on the validation split, choose the
"unknown pill" threshold there, measure both (ECE before and after, a reliability diagram; AUROC, coverage and
accuracy against classes held out of training), and store them beside the model for inference, where
pillsnap.infer.artefacts reads them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from omegaconf import DictConfig

from pillsnap.eval.box_calibration import box_line, box_summary, calibrate_boxes
from pillsnap.infer.artefacts import CALIBRATION_FILE, FEATURES_FILE
from pillsnap.infer.unknown import CROP_SOURCES, UnknownAnswer
from pillsnap.metrics.calibration import (
    bins_of,
    calibrated_probs,
    ece_of,
    ece_sampling_floor,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
)
from pillsnap.metrics.conformal import (
    SET_METHODS,
    conformal_threshold,
    nonconformity,
    scores_from_json,
    scores_to_json,
)
from pillsnap.metrics.novelty import (
    UNKNOWN_RULES,
    ClassGaussians,
    check_unknown_rule,
    rejection_report,
    rejection_threshold,
    unknown_scores,
)
from pillsnap.models.export import file_sha256
from pillsnap.utils import save_json
from pillsnap.utils.images import DECODE_ERRORS

LOGGER = logging.getLogger(__name__)


def _outputs(model: Any, loader: Any, device: Any, keep_log_probs: bool = True,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, log-probabilities, pre-logit features) of a WithFeatures model over a loader, in fp32.

    Filled into arrays of the data set's size as the batches come (RowFiller), not gathered and concatenated: at
    Stage 4 the validation log-probabilities are 1.7 GB and the fit crops' features 1.8 GB. Photos that failed to
    decode leave fewer rows than the data set has. keep_log_probs=False returns an empty [N, 0] array instead: with
    5,000 classes the log-probabilities of the training crops the class Gaussians are fit on would take gigabytes
    and nothing reads them."""
    import torch

    from pillsnap.utils.arrays import RowFiller

    size = len(loader.dataset)
    labels, log_probs, features = RowFiller(size), RowFiller(size), RowFiller(size)
    with torch.no_grad():
        for batch in loader:
            if batch is None:  # every photo of the batch failed to decode
                continue
            logits, feats = model(batch[0].to(device))
            labels.add(np.asarray(batch[1], np.int64))
            log_probs.add(torch.log_softmax(logits.float(), dim=-1).cpu().numpy() if keep_log_probs
                          else np.zeros((len(logits), 0), np.float32))
            features.add(feats.float().cpu().numpy())
    return labels.result((0,), np.int64), log_probs.result((0, 0)), features.result((0, 0))


# Forward passes only, no gradients: a batch this size fits any device at the classifier's input size.
EVAL_BATCH = 64
ANSWER_CROPS = 500  # validation crops whose answers are measured with the imprint evidence (each may be read: ~0.1 s)


def spread_sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of `limit` of `n` items drawn at random with `seed` (all of them when n <= limit). A data set
    lists its crops in the manifest's order, the combination photos' pills first and the single photos grouped by
    drug: its first few hundred crops at Stage 4 would be combination crops of the lowest codes only, and prediction
    sets fit on them hold no guarantee for the other photos."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


class ValAnswer(NamedTuple):
    """One validation crop as inference sees it before the answer: the classifier's output, the imprint read (None:
    not read) and the right drug."""

    classified: Any
    read: Any
    truth: str
    source: str | None = None  # single | combination (pillsnap.infer.unknown.CROP_SOURCES); None: not known


def _val_answers(model: Any, dataset: Any, temperature: float, class_names: list[str], class_map: dict, topk: int,
                 threads: int, indices: np.ndarray, reading: bool, unknown: UnknownAnswer,
                 sources: np.ndarray | None = None, check_unknown: bool = False) -> list[ValAnswer]:
    """The crops of `dataset` at `indices` through the classifier and, where inference would read (the
    contenders' imprints differ; with `check_unknown`, any top-1 with an imprint on record), the reader (the
    costly part, done once; the answers are then pure functions of these)."""
    import torch

    from pillsnap.infer.answer import Classified, classifier_candidates
    from pillsnap.infer.evidence import Evidence

    evidence = Evidence(class_map, read_imprints=reading, threads=threads, check_unknown=check_unknown)
    device = next(model.parameters()).device
    out = []
    for index in (int(i) for i in indices):
        try:
            crop, label = dataset.load_crop(index), int(dataset.labels[index])  # decoded once: model and reader
        except DECODE_ERRORS as err:
            LOGGER.warning("calibration: skipping an undecodable validation crop (%s)", err)
            continue
        with torch.no_grad():
            logits, feats = model(dataset.transform(crop)[None].to(device))
        probs = torch.softmax(logits.float() / temperature, -1).cpu().numpy()
        score = unknown.scores(probs, None if feats is None else feats.float().cpu().numpy())[0]
        candidates, reserve = classifier_candidates(probs, topk, class_names, class_map)[0]
        read = evidence.read(crop, candidates) if reading else None
        out.append(ValAnswer(Classified(candidates, score, reserve), read, class_names[label],
                             None if sources is None else str(sources[index])))
    return out


EVIDENCE_SCALES = np.round(np.exp(np.linspace(np.log(0.25), np.log(2.0), 13)), 3)  # 0.25 ... 2.0


def fit_evidence_scale(items: list[ValAnswer], class_map: dict, base: Any = None) -> float:
    """The factor on the imprint read's weights (RerankWeights.imprint and .likelihood; of `base`, by default the
    policy's) that minimises the negative log-likelihood of the right drug over the validation answers where a read
    was made, like the temperature does for the classifier: the weights were chosen for accuracy, this makes the
    posterior they give mean what it says. 1.0 when no read was made. A right drug outside the candidates gets the
    probability the candidates leave."""
    from pillsnap.infer.answer import answer_candidates
    from pillsnap.infer.ranking import rerank
    from pillsnap.infer.thresholds import WEIGHTS

    read = [item for item in items if item.read is not None]
    if not read:
        return 1.0
    candidates = [answer_candidates(item.classified, item.read, class_map) for item in read]  # as the answer weighs

    def nll_at(scale: float) -> float:
        weights = (base or WEIGHTS).with_read_scaled(scale)
        total = 0.0
        for item, weighed in zip(read, candidates, strict=True):
            ranked = rerank(weighed, class_map, item.read.text, item.read.score, None, weights,
                            likelihoods=item.read.likelihoods, read_likelihood=item.read.read_likelihood)
            p = {c["mapping_code"]: c["probability"] for c in ranked.candidates}
            rest = 1.0 - sum(p.values())
            total -= np.log(max(p.get(item.truth, rest), 1e-12))
        return total / len(read)

    return float(min(EVIDENCE_SCALES, key=nll_at))


def answer_calibration(model: Any, dataset: Any, temperature: float, class_names: list[str], class_map: dict,
                       topk: int, threads: int = 0, limit: int = ANSWER_CROPS, read_imprints: bool = True,
                       unknown: UnknownAnswer | None = None, sources: np.ndarray | None = None,
                       check_unknown: bool = False, held_out: Any = None, seed: int = 0) -> dict:
    """The final answers on `limit` validation crops drawn at random with `seed` (spread_sample; all of them when
    there are fewer), as inference makes them (the imprint read where the contenders' imprints differ, then the
    posterior of pillsnap.infer.answer).

    Returns `evidence_scale` (fit_evidence_scale; 1.0 without reads), `answers` (the top answers' accuracy and ECE
    at that scale, and at 1.0 under `unscaled`; None without the imprint reader, rapidocr-onnxruntime, or with
    `read_imprints` off) and `prediction_sets`: each answer named by the unknown-pill rule `unknown` (a pill it
    withholds claims no drug, its set is empty) scored under every conformal method (pillsnap.metrics.conformal),
    so that inference sets its threshold for whatever coverage it is configured with. With `check_unknown` (the
    imprint check: every pill read, a legible imprint like none of its candidates' answered "unknown"),
    `unknown_answers` measures the answers on the single-pill photos of drugs held out of training (`held_out`, a
    crop data set) against the known single-pill answers (answers_unknown_report)."""
    from pillsnap.infer.answer import decide_answer
    from pillsnap.infer.evidence import Evidence
    from pillsnap.infer.matching import KnownImprints
    from pillsnap.infer.thresholds import WEIGHTS

    reading = read_imprints and Evidence(class_map, read_imprints=read_imprints).reader() is not None
    check_unknown = check_unknown and reading
    known = KnownImprints(class_map) if check_unknown else None
    unknown = unknown or UnknownAnswer("probability", None)
    items = _val_answers(model, dataset, temperature, class_names, class_map, topk, threads,
                         spread_sample(len(dataset), limit, seed), reading, unknown, sources, check_unknown)
    scale = fit_evidence_scale(items, class_map)

    def answered(weights: Any, items: list[ValAnswer] = items, known: Any = known) -> list:
        # `known` set: the imprint check on (the answers of inference.imprint.unknown_check)
        return [decide_answer(item.classified, class_map, item.read, None,
                              unknown.for_answer(len(class_names), item.source), weights=weights, known=known)
                for item in items]

    weights = WEIGHTS.with_read_scaled(scale)
    answers = answered(weights)
    unknown_answers = None
    if held_out is not None and len(held_out) and check_unknown:
        # the held-out reads never fit a candidate: every turn is tried
        held_items = _val_answers(model, held_out, temperature, class_names, class_map, topk, threads,
                                  spread_sample(len(held_out), limit, seed), reading, unknown,
                                  np.full(len(held_out), "single"), check_unknown)
        unknown_answers = answers_unknown_report(answers, items, answered(weights, held_items))
        # Inference without the check: the same reads, kept only where the contenders differ by imprint
        unknown_answers["without_imprint_check"] = answers_unknown_report(
            answered(weights, _gated(items, class_map), None), items,
            answered(weights, _gated(held_items, class_map), None))
    set_scores: dict[str, list[float]] = {method: [] for method in SET_METHODS}
    for answer, item in zip(answers, items, strict=True):
        if answer.unknown:
            continue
        codes = [c["mapping_code"] for c in answer.candidates]
        where = codes.index(item.truth) if item.truth in codes else None
        probabilities = [c["probability"] for c in answer.candidates]
        for method, scores in set_scores.items():
            scores.append(nonconformity(method, probabilities, where))
    figures = None
    if reading:
        figures = {**_answer_figures(answers, items), "evidence_scale": scale,
                   "unscaled": {k: v for k, v in _answer_figures(answered(WEIGHTS), items).items() if k != "bins"}}
    sets = {"scores": {method: scores_to_json(scores) for method, scores in set_scores.items()},
            "n": len(set_scores["aps"]), "withheld_unknown": sum(a.unknown for a in answers),
            "imprint_reading": reading, "imprint_check": check_unknown,
            "unknown_rule": unknown.rule if unknown.active else None}
    return {"evidence_scale": scale, "answers": figures, "prediction_sets": sets, "unknown_answers": unknown_answers}


def _gated(items: list[ValAnswer], class_map: dict) -> list[ValAnswer]:
    """The items with the reads inference makes without the imprint check: only where the contenders differ."""
    from pillsnap.infer.ranking import should_read_imprint

    return [item if item.read is None or should_read_imprint(item.classified.topk, class_map)
            else item._replace(read=None) for item in items]


def answers_unknown_report(known: list, items: list[ValAnswer], held: list) -> dict:
    """The unknown-pill decision of the final answers: the known drugs' single-pill answers (`known`, with their
    `items`; every answer where the source is not known) against the held-out drugs' (`held`). `known_rejected` /
    `unknown_rejected`: the shares answered "unknown pill"; `unknown_rejected_by_imprint`: the held-out share the
    imprint check answered so (and the distance rule alone would not). `auroc` ranks the answers by the imprint
    check first (a foreign imprint is more telling than any distance), then by the unknown-pill score."""
    from sklearn.metrics import roc_auc_score

    single = [a for a, item in zip(known, items, strict=True) if item.source in (None, "single")]
    ranked = single + held
    raw = np.array([np.nan if a.unknown_score is None else a.unknown_score for a in ranked], np.float64)
    finite = raw[np.isfinite(raw)]
    top = (float(finite.max()) if finite.size else 0.0) + 1.0  # above every score: no distance outranks an imprint
    raw = np.nan_to_num(raw, nan=0.0, posinf=top, neginf=-top)
    scores = raw + np.array([top + 1.0 if a.unknown_by == "imprint" else 0.0 for a in ranked])
    labels = np.r_[np.zeros(len(single)), np.ones(len(held))]
    auroc = float(roc_auc_score(labels, scores)) if len(single) and len(held) else None
    return {"auroc": auroc, "known": len(single), "unknown": len(held),
            "known_rejected": float(np.mean([a.unknown for a in single])) if single else None,
            "unknown_rejected": float(np.mean([a.unknown for a in held])) if held else None,
            "unknown_rejected_by_imprint": float(np.mean([a.unknown_by == "imprint" for a in held])) if held
            else None}


def _answer_figures(answers: list, items: list[ValAnswer]) -> dict:
    """Accuracy and ECE of the top answers (the unknown-pill rule aside: every answer's top candidate counts)."""
    confidence = np.asarray([a.candidates[0]["probability"] for a in answers])
    correct = np.asarray([a.candidates[0]["mapping_code"] == item.truth for a, item in zip(answers, items,
                                                                                          strict=True)])
    return {"n": int(len(correct)), "accuracy": float(correct.mean()) if len(correct) else None,
            "ece": ece_of(confidence, correct), "ece_sampling_floor": ece_sampling_floor(confidence),
            "bins": bins_of(confidence, correct)}


def set_summary(sets: dict, method: str, coverage: float) -> dict:
    """The calibrated set rule at `coverage` and what it gives on the calibration answers themselves (coverage
    there is at least `coverage` by construction: the honest figure is on held-out photos). The conformal sets
    before inference.prediction_set.fill_to_coverage fills them: filled, they only grow."""
    scores = scores_from_json(sets["scores"][method])
    threshold = conformal_threshold(scores, coverage) if len(scores) else np.inf
    return {"method": method, "coverage": coverage, "threshold": _finite(threshold), "n": sets["n"],
            "withheld_unknown": sets["withheld_unknown"], "imprint_reading": sets["imprint_reading"],
            "calibration_coverage": float(np.mean(scores <= threshold)) if len(scores) else None}


def _finite(value: float) -> float | None:
    """None for an infinite threshold (nothing is rejected): JSON has no infinity."""
    return value if np.isfinite(value) else None


def _loader(dataset: Any, cfg: DictConfig) -> Any:
    from torch.utils.data import DataLoader

    from pillsnap.data.datasets import safe_collate

    return DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False, collate_fn=safe_collate,
                      num_workers=int(cfg.dataloader.num_workers))


# Held-out crops the unknown-pill rules are measured on. Early stages of the real data leave thousands of classes
# out; a bounded sample spread over them measures AUROC as well as all of them would, in minutes instead of hours.
HELD_OUT_CROPS = 2000


MIN_SOURCE_RIGHT = 20  # right validation answers of a crop source below which it takes the threshold over all


def _thresholds(val_scores: dict[str, np.ndarray], correct: np.ndarray, keep: float) -> dict[str, float | None]:
    """Each rule's threshold keeping `keep` of the right answers (None: off, or nothing to reject)."""
    return {name: _finite(rejection_threshold(scores, correct, keep)) if keep > 0 else None
            for name, scores in val_scores.items()}


def load_manifest_if_any(cfg: DictConfig) -> Any:
    from pillsnap.data import load_manifest

    try:
        return load_manifest(cfg.paths.manifest_dir)
    except FileNotFoundError:
        return None


def crop_sources(dataset: Any, manifest: Any) -> np.ndarray | None:
    """Per crop of a ClassificationDataset: "single" (a single-pill photo) or "combination" (a pill cut from a
    combination photo), from the manifest's image_type; None without a manifest or manifest rows."""
    if manifest is None or not hasattr(dataset, "rows"):
        return None
    single = set(manifest.loc[manifest["image_type"] == "single", "image_path"])
    return np.array(["single" if path in single else "combination" for path in dataset.rows.column("image_path")])


def _held_out_loader(cfg: DictConfig, known: set[str], manifest: Any) -> Any:
    """Single-pill photos of manifest classes the classifier never saw (None when the stage used them all): at most
    HELD_OUT_CROPS, spread evenly over those classes."""
    from pillsnap.data.datasets import ClassificationDataset

    rows = manifest[(manifest["image_type"] == "single") & ~manifest["mapping_code"].isin(known)]
    if rows.empty:
        return None
    per_class = max(1, HELD_OUT_CROPS // rows["mapping_code"].nunique())
    rows = rows.sample(frac=1.0, random_state=int(cfg.train.seed)).groupby("mapping_code", sort=False).head(per_class)
    rows = rows.head(HELD_OUT_CROPS)
    index = dict.fromkeys(rows["mapping_code"].unique(), 0)  # labels are unused: these classes have no index
    return _loader(ClassificationDataset(rows, index, int(cfg.model.image_size), False, float(cfg.data.crop_margin)),
                   cfg)


def plot_reliability(before: list[dict], after: list[dict], temperature: float, out_path: Path,
                     eces: tuple[float, float] | None = None, answers: dict | None = None,
                     floor: float | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin (marker area: photos in the bin), before and after
    temperature scaling and, when measured, of the final answers after the imprint evidence; the legend gives each
    curve's ECE, the title the ECE sampling alone would give a perfectly calibrated model on this many crops."""
    from pillsnap.eval.reports import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    labels = ["raw softmax", f"temperature {temperature:.2f}"]
    if eces is not None:
        labels = [f"{label} (ECE {ece:.3f})" for label, ece in zip(labels, eces, strict=True)]
    total = max(sum(b["count"] for b in before), 1)
    curves = [(before, labels[0], "o"), (after, labels[1], "s")]
    if answers and answers.get("bins"):
        curves.append((answers["bins"], f"answers after the imprint evidence (ECE {answers['ece']:.3f})", "^"))
    for bins, label, marker in curves:
        x, y = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        line = ax.plot(x, y, linewidth=1, label=label)[0]
        ax.scatter(x, y, s=[20 + 400 * b["count"] / total for b in bins], marker=marker, color=line.get_color())
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    title = f"Reliability on the validation split ({total} crops)"
    if floor is not None:
        title += f"\nECE of a perfectly calibrated model this size: about {floor:.2f}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)  # below the diagonal on the right: where few bins fall
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def calibrate_classifier(cfg: DictConfig, exp_dir: str | Path, build_loaders: Callable[[DictConfig], Any] | None = None,
                         keep_correct: float | None = None, device: Any = None) -> dict:
    """Fit and store the calibration of EXP's classification_best.pt; returns the report (also in reports/).

    The temperature is fit on the validation split. The class Gaussians of the feature_distance rule are fit on up
    to inference.unknown_fit_per_class training crops per class (without augmentation). Each unknown-pill rule's
    threshold keeps `keep_correct` of the right validation answers, and both rules are measured on the classes
    held out of the stage; inference uses the one inference.unknown_rule names. With inference.imprint.enabled,
    `answers` measures the final answers (after the imprint evidence) on up to ANSWER_CROPS validation crops, and
    with inference.imprint.unknown_check too, `unknown_eval_answers` the final answers' unknown-pill decision on the
    held-out drugs' photos (answers_unknown_report). With a detector, `box_check` holds its confidences in the
    labelled pills of the validation combination photos (pillsnap.eval.box_calibration)."""
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.infer.thresholds import WEIGHTS
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference
    from pillsnap.utils import resolve_device

    exp_dir = Path(exp_dir)
    rule = check_unknown_rule(str(cfg.inference.unknown_rule))  # a typo fails before any work
    device = resolve_device(None if device is None else str(device))
    ckpt = exp_dir / "checkpoints" / "classification_best.pt"
    loaders = (build_loaders or build_dataloaders_twostage)(cfg)
    if loaders.cls_val is None:
        raise ValueError("no validation split to calibrate on: raise data.val_ratio")
    keep = float(cfg.inference.unknown_keep_correct if keep_correct is None else keep_correct)
    model = WithFeatures(load_classifier_for_inference(ckpt, device)[0]).eval()
    y_true, log_p, features = _outputs(model, loaders.cls_val, device)
    temperature = fit_temperature(log_p, y_true)
    raw = calibrated_probs(log_p, 1.0)
    before = {"ece_before": expected_calibration_error(raw, y_true), "bins_before": reliability_bins(raw, y_true)}
    del raw  # one [N, C] array at a time: at 5,000 classes each is gigabytes
    cal = calibrated_probs(log_p, temperature)

    fit_view = loaders.cls_train.dataset.evaluation_view(int(cfg.inference.unknown_fit_per_class),
                                                         int(cfg.train.seed))
    fit_labels, _, fit_features = _outputs(model, _loader(fit_view, cfg), device, keep_log_probs=False)
    gaussians = ClassGaussians.fit(fit_features, fit_labels)
    correct = cal.argmax(axis=1) == y_true
    val_distances = gaussians.score(features)
    val_scores = {name: unknown_scores(name, cal, val_distances) for name in UNKNOWN_RULES}
    thresholds = _thresholds(val_scores, correct, keep)
    manifest = load_manifest_if_any(cfg)
    sources = crop_sources(loaders.cls_val.dataset, manifest)  # per crop of the data set (the answers index it)
    scored = sources  # per crop scored: the same, unless photos failed to decode and left fewer
    if sources is not None and len(sources) != len(y_true):
        LOGGER.warning("calibration: %d of %d validation crops could not be decoded; one unknown-pill threshold "
                       "serves both crop sources", len(sources) - len(y_true), len(sources))
        scored = None
    by_source = None if scored is None else {
        source: _thresholds({k: v[scored == source] for k, v in val_scores.items()}, correct[scored == source],
                            keep) if (correct & (scored == source)).sum() >= MIN_SOURCE_RIGHT else dict(thresholds)
        for source in CROP_SOURCES}
    # One threshold per rule: the single `unknown_threshold` of older files is only read (pillsnap.infer.artefacts).
    stored = {"temperature": temperature, "unknown_rule": rule, "unknown_thresholds": thresholds,
              "unknown_thresholds_by_source": by_source,
              "unknown_rule_description": UNKNOWN_RULES[rule],
              "unknown_keep_correct": keep, "features_file": FEATURES_FILE, "classifier_sha256": file_sha256(ckpt),
              "n_val": int(len(y_true)), "n_features_fit": int(len(fit_labels))}
    report = {**stored, "nll_before": nll(log_p, y_true), "nll_after": nll(log_p, y_true, temperature),
              "ece_before": before["ece_before"], "ece_after": expected_calibration_error(cal, y_true),
              "ece_sampling_floor": ece_sampling_floor(cal.max(axis=1)),
              "bins_before": before["bins_before"], "bins_after": reliability_bins(cal, y_true)}
    held_out = None if manifest is None else _held_out_loader(cfg, set(loaders.meta["class_names"]), manifest)
    if held_out is not None:
        _, unknown_log_p, unknown_features = _outputs(model, held_out, device)
        unknown_probs = calibrated_probs(unknown_log_p, temperature)
        unknown_distances = gaussians.score(unknown_features)
        held_out_classes = len(set(held_out.dataset.rows.column("mapping_code")))
        # The held-out photos are single-pill photos: they are compared with the known drugs' single-pill crops,
        # under the single-pill threshold (and, for the record, with every validation crop under the one threshold).
        single = np.ones(len(correct), bool) if scored is None else scored == "single"
        single_thresholds = thresholds if by_source is None else by_source["single"]
        by_rule = {}
        for name in UNKNOWN_RULES:
            held = unknown_scores(name, unknown_probs, unknown_distances)
            threshold = float("inf") if single_thresholds[name] is None else single_thresholds[name]
            by_rule[name] = rejection_report(val_scores[name][single], correct[single], held, threshold)
            by_rule[name].update(threshold=single_thresholds[name], held_out_classes=held_out_classes,
                                 known_crops="single")
        overall = float("inf") if thresholds[rule] is None else thresholds[rule]
        report["unknown_eval_all_crops"] = {
            **rejection_report(val_scores[rule], correct, unknown_scores(rule, unknown_probs, unknown_distances),
                               overall), "threshold": thresholds[rule], "known_crops": "all"}
        report["unknown_eval"], report["unknown_eval_by_rule"] = by_rule[rule], by_rule
    # The answers inference gives, the unknown-pill rule in force: their accuracy and ECE after the imprint
    # evidence, and the scores the prediction sets are calibrated on.
    outcome = {"answers": None, "evidence_scale": 1.0, "prediction_sets": None}
    if hasattr(loaders.cls_val.dataset, "load_crop"):  # photos to answer (not a tensor-only data set)
        outcome = answer_calibration(
            model, loaders.cls_val.dataset, temperature, list(loaders.meta["class_names"]),
            dict(loaders.meta.get("class_map") or {}), int(cfg.inference.topk), int(cfg.inference.imprint.threads),
            read_imprints=bool(cfg.inference.imprint.enabled), check_unknown=bool(cfg.inference.imprint.unknown_check),
            held_out=None if held_out is None else held_out.dataset,
            unknown=UnknownAnswer(rule, thresholds[rule], gaussians, None if by_source is None else {
                source: values[rule] for source, values in by_source.items()}) if keep > 0 else None, sources=sources,
            seed=int(cfg.train.seed))
    if outcome["answers"] is not None:
        report["answers"] = outcome["answers"]
    if outcome.get("unknown_answers") is not None:
        report["unknown_eval_answers"] = outcome["unknown_answers"]
    stored["evidence_scale"] = report["evidence_scale"] = outcome["evidence_scale"]
    # the weights the scale and the sets were fit with: an older calibration, fit without the candidates'
    # likelihoods, is answered without them (pillsnap.infer.pipeline)
    stored["likelihood_weight"], stored["likelihood_cap"] = WEIGHTS.likelihood, WEIGHTS.likelihood_cap
    stored["imprint_recall"] = True  # fit with drugs below the top-k brought back by their imprint
    if outcome["prediction_sets"] is not None:
        stored["prediction_sets"] = outcome["prediction_sets"]
        report["prediction_sets"] = set_summary(outcome["prediction_sets"], str(cfg.inference.prediction_set.method),
                                                float(cfg.inference.prediction_set.coverage))
    boxes = calibrate_boxes(cfg, exp_dir, manifest, device)  # the detector's confidences, for the box check
    if boxes is not None:
        stored["box_check"] = boxes
        report["box_check"] = box_summary(boxes, cfg.inference)
    # The class Gaussians and the thresholds fit on them are written together, the JSON last, naming the file's hash.
    stored["features_sha256"] = file_sha256(gaussians.save(exp_dir / "checkpoints" / FEATURES_FILE))
    report["features_sha256"] = stored["features_sha256"]
    save_json(exp_dir / "checkpoints" / CALIBRATION_FILE, stored)
    save_json(exp_dir / "reports" / "calibration.json", report)
    plot_reliability(report["bins_before"], report["bins_after"], temperature, exp_dir / "reports" / "reliability.png",
                     (report["ece_before"], report["ece_after"]), report.get("answers"), report["ece_sampling_floor"])
    LOGGER.info("calibration: temperature %.3f, ECE %.4f -> %.4f, NLL %.4f -> %.4f; unknown pills by %s%s",
                temperature, report["ece_before"], report["ece_after"], report["nll_before"], report["nll_after"],
                rule, _unknown_line(report.get("unknown_eval")))
    if report.get("box_check"):
        LOGGER.info("calibration: %s", box_line(report["box_check"]))
    sets = report.get("prediction_sets")
    if sets:
        LOGGER.info("calibration: prediction sets (%s) at coverage %.2f from %d validation answers named: "
                    "threshold %s", sets["method"], sets["coverage"], sets["n"],
                    "none (too few answers: every candidate is in the set)" if sets["threshold"] is None
                    else f"{sets['threshold']:.4f}")
    return report


def _unknown_line(unknown: dict | None) -> str:
    if not unknown:
        return " (no held-out classes to test it on)"
    return (f"; held-out classes: AUROC {unknown['auroc']:.3f}, coverage {unknown['coverage']:.3f}, accuracy answered "
            f"{unknown['accuracy_answered']:.3f}, unknowns rejected {unknown['unknown_rejected']:.3f}")
