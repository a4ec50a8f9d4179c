"""The recogniser's own reading, the reference the candidates' likelihoods are measured against, measured as an
imprint (characters outside 0-9A-Z count as "something else": RapidOcrModels.reading_log_likelihood) against
the exact string's likelihood (the reader before), on a trained experiment's photos in the same run.

1. The experiment's validation crops through calibration's answers (pillsnap.eval.answer_calibration), once per
   reference: the evidence scale fit, the answers' accuracy, ECE and its floor, and the held-out drugs' unknown-pill
   answers (AUROC, rejected shares).
2. Its test photos through the pipeline in auto mode with each reference (the experiment's calibration for both,
   one thread, photos alternating): single-photo accuracy, all pills right on the combination photos and their
   pills one by one, the prediction sets (coverage, mean size, sure share and accuracy), and every pill answered
   differently.

    .venv/bin/python bench/reading_reference.py --exp runs/demo/exp [--skip-validation]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import numpy as np


@contextlib.contextmanager
def reference(exact: bool) -> Iterator[None]:
    """The reader's reference: as an imprint (this code) or, with `exact`, the exact string (the reader before)."""
    from pillsnap.infer.ocr import RapidOcrModels

    saved = RapidOcrModels.reading_log_likelihood
    if exact:
        RapidOcrModels.reading_log_likelihood = lambda self, lines, text: self.log_likelihoods(lines, [text])[0]
    try:
        yield
    finally:
        RapidOcrModels.reading_log_likelihood = saved


def validation(cfg) -> dict[str, dict]:
    from pillsnap.eval import calibration

    out = {}
    for name, exact in (("exact string", True), ("as an imprint", False)):
        with reference(exact):
            report = calibration.calibrate_classifier(cfg, cfg.paths.exp_dir)  # rewrites EXP's calibration files
        answers, unknown = report.get("answers") or {}, report.get("unknown_eval_answers") or {}
        out[name] = {"evidence_scale": report["evidence_scale"], "accuracy": answers.get("accuracy"),
                     "ece": answers.get("ece"), "ece_floor": answers.get("ece_sampling_floor"),
                     "auroc": unknown.get("auroc"), "unknown_rejected": unknown.get("unknown_rejected"),
                     "known_rejected": unknown.get("known_rejected")}
    return out  # the files left are this code's (the last pass)


def test_photos(cfg) -> tuple[dict[str, dict], list[str]]:
    import torch

    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage
    from pillsnap.eval.pipeline_eval import _photo_outcome, photo_groups, set_figures
    from pillsnap.infer.pipeline import Predictor

    torch.set_num_threads(1)
    photos = photo_groups(select_stage(load_manifest(cfg.paths.manifest_dir), cfg), "test")
    predictor = Predictor(cfg.paths.exp_dir, cfg, "cpu")
    known = set(predictor.class_names)
    outcomes: dict[str, list[dict]] = {"exact string": [], "as an imprint": []}
    for k, photo in enumerate(photos):  # alternating which goes first
        order = list(outcomes) if k % 2 == 0 else list(outcomes)[::-1]
        for name in order:
            with reference(name == "exact string"):
                outcomes[name].append(_photo_outcome(photo, predictor.predict(photo["image_path"], mode="auto"),
                                                     known))
    figures, changed = {}, []
    for name, done in outcomes.items():
        combos = [o for o in done if o["image_type"] != "single"]
        figures[name] = {"single": float(np.mean([o["all_right"] for o in done if o["image_type"] == "single"])),
                         "combo_all_right": float(np.mean([o["all_right"] for o in combos])),
                         "combo_pills": float(np.mean([p["right"] for o in combos for p in o["pills"]])),
                         **{k: set_figures(done)[k] for k in ("coverage", "mean_set_size", "sure_share",
                                                               "sure_accuracy")}}
    for before, after in zip(*outcomes.values(), strict=True):
        for p, q in zip(before["pills"], after["pills"], strict=True):
            if p["right"] != q["right"] or p["set"] != q["set"]:
                top = [(c, round(v, 3)) for c, v in q["topk"][:2]]
                changed.append(f"{after['image_path'].rsplit('/', 1)[-1]} {p['code']}: right {p['right']} -> "
                               f"{q['right']}, set {len(p['set'] or [])} -> {len(q['set'] or [])}, now {top}")
    return figures, changed


def main() -> None:
    from pillsnap.config import load_run_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="a trained experiment (its calibration files are rewritten)")
    parser.add_argument("--skip-validation", action="store_true", help="test photos only, calibration as it is")
    args = parser.parse_args()
    # its predictions are not a user's: they stay out of the run's hard-case log
    cfg = load_run_config(args.exp, ["inference.hard_cases.enabled=false"], None, required=("manifest_dir",))

    def show(title: str, figures: dict[str, dict]) -> None:
        print(title)
        for name, values in figures.items():
            print(f"  {name:14s} " + "  ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in values.items()))

    if not args.skip_validation:
        show("validation answers (calibration, each reference fit on its own)", validation(cfg))
    figures, changed = test_photos(cfg)
    show("test photos, auto mode", figures)
    before, after = figures.values()
    print("ratio (as an imprint / exact string): " + ", ".join(
        f"{k} {after[k] / before[k]:.3f}x" for k in ("combo_all_right", "combo_pills", "mean_set_size", "sure_share")
        if before[k]))
    print(f"pills answered differently: {len(changed)}")
    for line in changed:
        print("  " + line)


if __name__ == "__main__":
    main()
