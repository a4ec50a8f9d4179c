"""Prediction sets with a threshold per crop source (this code: inference.prediction_set.by_source, each source
with MIN_SOURCE_SET_ANSWERS calibration answers of its own gets its own conformal threshold) against one threshold
over every answer (the code before), on a trained experiment, from the same answers in the same run.

1. The experiment is calibrated again (its calibration files are rewritten), so that the stored scores name each
   answer's crop source; the thresholds of both rules are printed with each source's count.
2. Its test photos go through the pipeline once in auto mode (one thread). Each named pill's set is drawn under
   both rules from the same candidates (pillsnap.eval.pipeline_eval.with_sets): coverage, mean set size, sure share
   and the sure answers' accuracy, over all pills and per crop source.
3. A rehearsal at the scale a real calibration has (500 answers, ANSWER_CROPS): answers drawn from two synthetic
   sources, one of sharp answers and one of spread ones (the probabilities right by construction), calibrated on
   500 (250 each) and measured on 20,000 new ones per source, over many draws: each source's coverage under both
   rules (mean and 5th percentile). The demo's validation split is too small to show it (fewer than
   MIN_SOURCE_SET_ANSWERS combination answers).

    .venv/bin/python bench/sets_by_source.py --exp runs/demo/exp
"""

from __future__ import annotations

import argparse

import numpy as np

SOURCES = ("single", "combination")


def test_outcomes(cfg) -> tuple[list[dict], object]:
    import torch

    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import _photo_outcome, photo_groups
    from pillsnap.infer.pipeline import Predictor

    torch.set_num_threads(1)
    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), "test")
    predictor = Predictor(cfg.paths.exp_dir, cfg, "cpu")
    known = set(predictor.class_names)
    return [_photo_outcome(photo, predictor.predict(photo["image_path"], mode="auto"), known)
            for photo in photos], predictor


def _line(name: str, f: dict) -> str:
    right = "n/a" if f["sure_accuracy"] is None else f"{f['sure_accuracy']:.3f}"
    parts = [f"coverage {f['coverage']:.3f} of {f['named']}", f"mean size {f['mean_set_size']:.3f}",
             f"sure {f['sure_share']:.3f}", f"sure right {right}"]
    return f"    {name:<12} " + " | ".join(parts)


def rehearsal(draws: int, n_cal: int, n_new: int, coverage: float, seed: int = 0) -> dict:
    """Each source's coverage on new answers under both rules, over `draws` calibrations of `n_cal` answers (the
    sources in equal shares)."""
    from pillsnap.infer.artefacts import MIN_SOURCE_SET_ANSWERS
    from pillsnap.metrics.conformal import conformal_threshold, group_thresholds

    rng = np.random.default_rng(seed)
    alphas = {"single": 0.05, "combination": 1.5}  # Dirichlet concentration over 8 drugs: sharp vs spread answers

    def draw(source: str, n: int) -> np.ndarray:
        """LAC scores (1 - the right drug's probability) of `n` answers right by construction."""
        probs = rng.dirichlet(np.full(8, alphas[source]), size=n)
        right = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
        return 1.0 - probs[np.arange(n), right]

    new = {source: draw(source, n_new) for source in SOURCES}
    covered: dict[str, dict[str, list[float]]] = {rule: {s: [] for s in SOURCES} for rule in ("one", "per source")}
    for _ in range(draws):
        scores = np.concatenate([draw(source, n_cal // 2) for source in SOURCES])
        groups = [source for source in SOURCES for _ in range(n_cal // 2)]
        pooled = conformal_threshold(scores, coverage)
        own = group_thresholds(scores, groups, coverage, MIN_SOURCE_SET_ANSWERS)
        for source in SOURCES:
            covered["one"][source].append(float(np.mean(new[source] <= pooled)))
            covered["per source"][source].append(float(np.mean(new[source] <= own.get(source, pooled))))
    return covered


def main() -> None:
    from pillsnap.config import load_run_config
    from pillsnap.eval.answer_calibration import own_thresholds_text, set_summary
    from pillsnap.eval.calibration import calibrate_classifier
    from pillsnap.eval.pipeline_eval import set_figures, with_sets
    from pillsnap.infer.artefacts import load_set_rule

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="a trained experiment (its calibration files are rewritten)")
    parser.add_argument("--draws", type=int, default=200, help="calibrations drawn in the rehearsal (default 200)")
    args = parser.parse_args()
    # its predictions are not a user's: they stay out of the run's hard-case log
    cfg = load_run_config(args.exp, ["inference.hard_cases.enabled=false"], None, required=("manifest_dir",))
    settings = cfg.inference.prediction_set
    report = calibrate_classifier(cfg, cfg.paths.exp_dir)
    sets = report.get("prediction_sets")
    if not sets:
        raise SystemExit("the calibration has no prediction sets (imprint reading off?)")
    print(f"calibration: {sets['method']} at {sets['coverage']:.2f}, {sets['n']} answers named, threshold over all "
          f"{sets['threshold']}{own_thresholds_text(sets)}")
    outcomes, predictor = test_outcomes(cfg)
    reading = bool(cfg.inference.imprint.enabled)
    figures = {}
    for name, by_source in (("one threshold (before)", False), ("per source (now)", True)):
        rule, problem = load_set_rule(predictor.calibration, str(settings.method), float(settings.coverage), reading,
                                      predictor.check_unknown, bool(settings.fill_to_coverage), by_source)
        if rule is None:
            raise SystemExit(f"no prediction sets: {problem}")
        figures[name] = set_figures(with_sets(outcomes, rule))
        print(f"  {name}: thresholds {rule.threshold:.4f}"
              f"{'' if not rule.by_source else ' ' + str({k: round(v, 4) for k, v in rule.by_source.items()})}")
        print(_line("all", figures[name]))
        for source, f in (figures[name].get("by_source") or {}).items():
            print(_line(source, f))
    before, now = figures["one threshold (before)"], figures["per source (now)"]
    print("ratio (now / before): " + ", ".join(
        f"{k} {now[k] / before[k]:.3f}x" for k in ("coverage", "mean_set_size", "sure_share") if before[k]))
    summary = set_summary(predictor.calibration["prediction_sets"], str(settings.method), float(settings.coverage))
    print(f"validation answers per source: {summary['n_by_source']}")

    coverage = float(settings.coverage)
    covered = rehearsal(args.draws, 500, 20000, coverage)
    print(f"rehearsal: 500 calibration answers (250 per source), 20,000 new answers per source, {args.draws} draws, "
          f"LAC at {coverage:.2f}")
    for rule, by in covered.items():
        print(f"  {rule:<10} " + " | ".join(
            f"{source} coverage mean {np.mean(v):.3f}, 5th percentile {np.percentile(v, 5):.3f}"
            for source, v in by.items()))
    print("ratio (per source / one) of the combination crops' mean coverage: "
          f"{np.mean(covered['per source']['combination']) / np.mean(covered['one']['combination']):.3f}x")


if __name__ == "__main__":
    main()
