"""Scale rehearsal: a synthetic data set in the real AI Hub layout at a stage's shape, end to end, one child process
per phase (wall time, CPU time and peak RSS of each), against the Stage 1 shape measured in the same run.

    python bench/scale_rehearsal.py --rows 500000 --classes 5000 --json /tmp/scale_4.json

Phases: synth (placeholder photos, the generator's real label JSON, TS_/TL_ zips), scan, manifest (stage selection
and manifest_{train,val}.csv), loaders (build, then a few batches), train (one epoch capped at --steps steps with
the real head size, its validation pass capped at --val-cap crops), calibration (the real fitting code on random
features of the real dimension: a forward pass over every crop is out of reach on CPU), stage_eval (the stage
evaluation's public entry point) and export (ONNX of the classifier with the full head). Data go under --work-dir
and are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PHASES = ("synth", "scan", "manifest", "loaders", "train", "calibration", "stage_eval", "export")
BASELINE = (5000, 50)  # the Stage 1 shape: every ratio is against it, measured in the same run
FEATURE_DIM = 1280  # tf_efficientnetv2_s pre-logit features
STAGE = 4  # every shape runs as stage 4 with the stage's sizes set to the shape (stage 4 uses every class it is given)
UNITS = {"synth": "label", "scan": "label", "manifest": "row", "loaders": "row", "train": "sample",
         "calibration": "row", "stage_eval": "row", "export": "model"}


# ---- the phases (each runs in its own child process) -----------------------------------------------------------------
def _cfg(shape: dict) -> Any:
    """The repository's config for this shape: stage sizes set to the shape, CPU-sized model and batches."""
    from omegaconf import OmegaConf

    from pillsnap.config import load_config

    root, stage = Path(shape["dir"]), STAGE
    overrides = [
        f"paths.manifest_dir={root / 'manifests'}", f"paths.exp_dir={root / 'exp'}",
        f"paths.cache_dir={root / 'cache'}", f"data.progressive_validation.current_stage={stage}",
        f"data.progressive_validation.stage_{stage}.max_samples={shape['rows']}",
        f"data.progressive_validation.stage_{stage}.max_classes={shape['classes']}",
        f"model.backbone={shape.get('backbone', 'tf_efficientnetv2_s')}", f"model.image_size={shape['image_size']}",
        "model.det_image_size=64",
        "model.pretrained=false",
        f"train.batch_size={shape['batch_size']}", "train.epochs=1", f"train.max_steps_per_epoch={shape['steps']}",
        "train.strategy=classification", "train.stage_evaluation=false", "dataloader.num_workers=1",
        "dataloader.prefetch_factor=2", "train.detection.batch_size=4",
    ]
    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml", overrides)
    OmegaConf.update(cfg, f"train.stage_overrides.stage_{stage}", {}, merge=False)  # no compile on 2 CPU cores
    return cfg


def _label_files(shape: dict) -> int:
    return int(json.loads((Path(shape["dir"]) / "synth.json").read_text())["label_files"])


def phase_synth(shape: dict) -> dict:
    from pillsnap.data.synth import generate_dataset

    single = shape["rows"] * (1 - shape["combo_share"])
    per_class = max(1, round(single / shape["classes"]))
    combo = round(shape["rows"] * shape["combo_share"] / 3.5)  # 3-4 pills per combination photo
    summary = generate_dataset(Path(shape["dir"]) / "data", shape["classes"], per_class, combo, seed=0,
                               zip_output=True, image_scale=0.04, workers=1, progress=False, placeholder_images=True)
    (Path(shape["dir"]) / "synth.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "classes"}))
    return {"items": summary["label_files"], "photos": summary["single_images"] + combo}


def phase_scan(shape: dict) -> dict:
    from pillsnap.data.scan import scan_dataset

    root = Path(shape["dir"])
    report = scan_dataset(root / "data", root / "manifests", workers=shape["workers"], progress=False)
    return {"items": report["label_files"], "kept": report["records_kept"], "classes": report["classes"]}


def phase_manifest(shape: dict) -> dict:
    from pillsnap.data.manifest_check import stage_manifest_dir
    from pillsnap.data.scan import load_manifest, write_manifest_csv
    from pillsnap.data.stages import select_stage

    cfg = _cfg(shape)
    manifest = load_manifest(cfg.paths.manifest_dir)
    rows = select_stage(manifest, cfg)
    out = stage_manifest_dir(cfg.paths.manifest_dir, STAGE)  # where `pillsnap data manifest` writes them
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        write_manifest_csv(rows[rows["split"] == split], out / f"manifest_{split}.csv")
    return {"items": len(manifest), "stage_rows": len(rows), "stage_classes": int(rows["mapping_code"].nunique())}


def phase_loaders(shape: dict) -> dict:
    from omegaconf import OmegaConf

    from pillsnap.data import build_dataloaders_twostage

    cfg = _cfg(shape)
    OmegaConf.update(cfg, "train.strategy", "interleaved")  # the detection loaders (YOLO export) too
    start = time.perf_counter()
    loaders = build_dataloaders_twostage(cfg)
    built = time.perf_counter() - start
    batches = 0
    for _batch in loaders.cls_train:
        batches += 1
        if batches >= shape["batches"]:
            break
    return {"items": sum(loaders.meta["sizes"].get(f"cls_{s}", 0) for s in ("train", "val", "test")),
            "build_s": round(built, 2), "batches": batches, "iterate_s": round(time.perf_counter() - start - built, 2),
            "num_classes": loaders.meta["num_classes"], "sizes": loaders.meta["sizes"]}


def capped_loaders(cfg: Any, val_cap: int) -> Any:
    """The real loaders with the validation loader cut to `val_cap` crops spread over the split: a CPU cannot push
    a Stage 4 validation split (~75,000 crops) through the network within a rehearsal."""
    import numpy as np

    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.data.loaders import _classification_loader

    loaders = build_dataloaders_twostage(cfg)
    if loaders.cls_val is None:
        return loaders
    view = loaders.cls_val.dataset.evaluation_view()
    step = max(1, len(view) // val_cap)
    view = view.subset(np.arange(len(view))[::step][:val_cap])
    return loaders._replace(cls_val=_classification_loader(view, cfg, False, int(cfg.dataloader.num_workers)))


def phase_train(shape: dict) -> dict:
    from functools import partial

    from pillsnap.engine import run_training
    from pillsnap.train import write_reports

    cfg = _cfg(shape)
    code, trainer = run_training(cfg, partial(capped_loaders, val_cap=shape["val_cap"]))
    if trainer is None or code != 0:
        raise RuntimeError(f"training ended with exit code {code} (see {cfg.paths.exp_dir}/logs)")
    trained = time.perf_counter()
    write_reports(trainer)  # what pillsnap train does next: confusion matrix and curves over every class
    stream = [json.loads(line) for line in (Path(cfg.paths.exp_dir) / "reports" / "metrics.jsonl").open()]
    compute = sorted(r["compute_time"] for r in stream if r.get("type") == "step")
    return {"items": shape["steps"] * shape["batch_size"], "steps": len(compute),
            "median_compute_s": round(compute[len(compute) // 2], 3) if compute else None,
            "reports_s": round(time.perf_counter() - trained, 2)}


def phase_calibration(shape: dict) -> dict:
    """calibrate_classifier's numerical work at the stage's sizes: the temperature fit on validation log-probs
    [val, classes], the class Gaussians on up to inference.unknown_fit_per_class training features per class, the
    validation distances, the thresholds and ECE. Random features and logits stand in for the network's outputs."""
    import numpy as np
    import pandas as pd

    from pillsnap.data.manifest_check import stage_manifest_dir
    from pillsnap.metrics.calibration import calibrated_probs, expected_calibration_error, fit_temperature
    from pillsnap.metrics.novelty import ClassGaussians, rejection_threshold, unknown_scores

    cfg = _cfg(shape)
    per_class = int(cfg.inference.unknown_fit_per_class)
    read = lambda s: pd.read_csv(stage_manifest_dir(cfg.paths.manifest_dir, STAGE) / f"manifest_{s}.csv",  # noqa: E731
                                 usecols=["mapping_code", "image_type"])
    train, val = read("train"), read("val")
    codes = {c: i for i, c in enumerate(sorted(set(train["mapping_code"]) | set(val["mapping_code"])))}
    counts = train["mapping_code"].map(codes).value_counts()
    fit_labels = np.repeat(counts.index.to_numpy(), np.minimum(counts.to_numpy(), per_class))
    val_labels = val["mapping_code"].map(codes).to_numpy()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((len(codes), FEATURE_DIM), np.float32)
    # drawn in float32 (a float64 draw of 350,000 x 1,280 would be the phase's peak, not the calibration's)
    fit_features = centres[fit_labels] + rng.standard_normal((len(fit_labels), FEATURE_DIM), np.float32)
    val_features = centres[val_labels] + rng.standard_normal((len(val_labels), FEATURE_DIM), np.float32)
    logits = rng.standard_normal((len(val_labels), len(codes)), np.float32)
    logits[np.arange(len(val_labels)), val_labels] += 4.0
    start = time.perf_counter()
    temperature = fit_temperature(logits, val_labels)
    probs = calibrated_probs(logits, temperature)
    correct = probs.argmax(1) == val_labels
    gaussians = ClassGaussians.fit(fit_features, fit_labels)
    distances = gaussians.score(val_features)
    thresholds = [rejection_threshold(unknown_scores(r, probs, distances), correct, 0.95)
                  for r in ("feature_distance", "probability")]
    ece = expected_calibration_error(probs, val_labels)
    work_s = time.perf_counter() - start
    return {"items": len(fit_labels) + len(val_labels), "fit_rows": len(fit_labels), "val_rows": len(val_labels),
            "classes": len(codes), "work_s": round(work_s, 2),
            "temperature": round(temperature, 3), "ece": round(ece, 4), "thresholds": [round(t, 2) for t in thresholds],
            "answer_sample": answer_sample_spread(val, int(cfg.train.seed))}


def answer_sample_spread(val: Any, seed: int) -> dict:
    """The validation crops calibration answers through the reader (the evidence scale and the prediction sets are
    fit on them): ANSWER_CROPS drawn by `spread_sample` against the split's first ANSWER_CROPS, the data set's
    order being the stage manifest's. Per draw: drugs covered and the share of single-photo crops."""
    from pillsnap.eval.answer_calibration import ANSWER_CROPS, spread_sample

    def spread(rows: Any) -> dict:
        return {"crops": len(rows), "drugs": int(rows["mapping_code"].nunique()),
                "single_share": round(float((rows["image_type"] == "single").mean()), 3)}

    return {"split": spread(val), "first": spread(val.iloc[:ANSWER_CROPS]),
            "drawn": spread(val.iloc[spread_sample(len(val), ANSWER_CROPS, seed)])}


def phase_stage_eval(shape: dict) -> dict:
    from functools import partial

    from pillsnap.eval.stage_eval import evaluate_stage

    cfg = _cfg(shape)
    report = evaluate_stage(cfg, cfg.paths.exp_dir, assume_yes=True,
                            build_loaders=partial(capped_loaders, val_cap=shape["val_cap"]))
    return {"items": shape["rows"], "status": report.get("status"),
            "n_eval_samples": (report.get("results") or {}).get("n_eval_samples")}


def phase_export(shape: dict) -> dict:
    from pillsnap.models.classifier import load_classifier_for_inference
    from pillsnap.models.export import export_classifier_onnx

    cfg = _cfg(shape)
    exp = Path(cfg.paths.exp_dir)
    model = load_classifier_for_inference(exp / "checkpoints" / "classification_best.pt")[0]
    path = export_classifier_onnx(model, exp / "export" / "classifier.onnx", int(cfg.model.image_size))
    head = [p for p in model.parameters()][-1].shape[0]
    return {"items": 1, "head_classes": int(head), "onnx_mb": round(path.stat().st_size / 2**20, 1)}


def run_phase(name: str, shape: dict) -> dict:
    """Child side: run one phase, return its figures (work time measured here, after the imports)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    result = globals()[f"phase_{name}"](shape)
    result["seconds"] = time.perf_counter() - start
    return result


# ---- the parent: one child per phase, peak memory, the table ---------------------------------------------------------
class TreeRss:
    """Samples the summed RSS of a process and its descendants (shared pages of forked workers count twice, so this
    is an upper bound; the kernel's ru_maxrss is the exact peak of the largest single process)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                proc = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(name: str, shape: dict, log: Path) -> dict:
    """Run one phase in a fresh interpreter; wall and work seconds, CPU seconds and peak RSS of the phase."""
    cmd = [sys.executable, __file__, "--child", name, "--shape", json.dumps(shape)]
    start = time.perf_counter()
    with log.open("a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        tree = TreeRss(proc.pid)
        out = proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    tree_peak = tree.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"phase {name} failed (exit {proc.returncode}); see {log}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "phase": name, "process_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "tree_rss_mib": round(tree_peak / 2**20, 1)}


def run_shape(rows: int, classes: int, args: argparse.Namespace) -> list[dict]:
    shape = {"rows": rows, "classes": classes, "dir": str(Path(args.work_dir) / f"r{rows}_c{classes}"),
             "combo_share": args.combo_share, "workers": args.workers, "image_size": args.image_size,
             "batch_size": args.batch_size, "steps": args.steps, "batches": args.batches, "val_cap": args.val_cap,
             "backbone": args.backbone}
    shutil.rmtree(shape["dir"], ignore_errors=True)
    Path(shape["dir"]).mkdir(parents=True)
    results: list[dict] = []
    for name in args.phases:
        try:
            result = measure(name, shape, Path(shape["dir"]).parent / "phases.log")
        except (RuntimeError, ValueError) as err:  # reported in the table; later phases need this one's output
            print(f"  {rows}/{classes} {name}: {err}", flush=True)
            results.append({"phase": name, "rows": rows, "classes": classes, "error": str(err)})
            break
        result.update(rows=rows, classes=classes, us_per_item=1e6 * result["seconds"] / max(result["items"], 1),
                      cpu_us_per_item=1e6 * result["cpu_s"] / max(result["items"], 1))
        print(f"  {rows}/{classes} {name}: {result['seconds']:.1f}s, peak {result['peak_rss_mib']:.0f} MiB",
              flush=True)
        results.append(result)
        if args.json:  # figures so far, in case a later phase of a long run dies
            partial = Path(args.json).with_suffix(f".r{rows}_c{classes}.partial.json")
            partial.write_text(json.dumps(results, default=str))
    if not args.keep:
        shutil.rmtree(shape["dir"], ignore_errors=True)
    return results


def with_ratios(results: list[dict], baseline: list[dict]) -> list[dict]:
    base = {r["phase"]: r for r in baseline}
    for r in results:
        b = base.get(r["phase"])
        ok = b is not None and "error" not in r and "error" not in b
        r["ratio"] = r["us_per_item"] / b["us_per_item"] if ok else None
        r["cpu_ratio"] = r["cpu_us_per_item"] / b["cpu_us_per_item"] if ok else None
    return results


def table(results: list[dict]) -> str:
    head = ("| shape (rows/classes) | phase | items | wall s | CPU s | peak RSS MiB | tree RSS MiB | us/item "
            "| ratio vs Stage 1 shape (wall / CPU) |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['rows']}/{r['classes']} | {r['phase']} | failed: {r['error']} |" + " |" * 6)
            continue
        ratio = "baseline" if r.get("ratio") is None else f"{r['ratio']:.2f}x / {r['cpu_ratio']:.2f}x"
        lines.append(f"| {r['rows']}/{r['classes']} | {r['phase']} | {r['items']} {UNITS[r['phase']]}s "
                     f"| {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['tree_rss_mib']:.0f} "
                     f"| {r['us_per_item']:.1f} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[500_000],
                        help="label rows of each shape measured (default: Stage 4)")
    parser.add_argument("--classes", type=int, nargs="+", default=[5000],
                        help="classes of each shape, one per --rows value (default: Stage 4)")
    parser.add_argument("--baseline-rows", type=int, default=BASELINE[0])
    parser.add_argument("--baseline-classes", type=int, default=BASELINE[1])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--work-dir", default="/tmp/scale", help="data and runs go here (deleted unless --keep)")
    parser.add_argument("--combo-share", type=float, default=0.1, help="share of rows from combination photos")
    parser.add_argument("--workers", type=int, default=2, help="scan worker processes")
    parser.add_argument("--backbone", default="tf_efficientnetv2_s", help="classifier backbone (the design's)")
    parser.add_argument("--image-size", type=int, default=64, help="classifier input size of the short epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="train.max_steps_per_epoch of the short epoch")
    parser.add_argument("--batches", type=int, default=10, help="classification batches drawn in the loaders phase")
    parser.add_argument("--val-cap", type=int, default=64, help="validation crops of the train and stage_eval phases")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the data under --work-dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if len(args.rows) != len(args.classes):
        parser.error("give one --classes value per --rows value")
    for rows, classes in [*zip(args.rows, args.classes, strict=True), (args.baseline_rows, args.baseline_classes)]:
        if min(rows, classes) < 1 or rows < classes:
            parser.error(f"--rows {rows} --classes {classes}: both must be positive, with at least one row per class")
        if math.ceil(rows * (1 - args.combo_share) / classes) > 432:
            parser.error(f"--rows {rows} --classes {classes}: more than 432 single-pill photos per class (the "
                         "distinct photo conditions): add classes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_phase(args.child, json.loads(args.shape))))
        return 0
    shapes = list(zip(args.rows, args.classes, strict=True))
    print(f"scale rehearsal: baseline {args.baseline_rows}/{args.baseline_classes}, shapes "
          f"{' '.join(f'{r}/{c}' for r, c in shapes)}, phases {' '.join(args.phases)}", flush=True)
    baseline = with_ratios(run_shape(args.baseline_rows, args.baseline_classes, args), [])
    results = [r for rows, classes in shapes if (rows, classes) != (args.baseline_rows, args.baseline_classes)
               for r in with_ratios(run_shape(rows, classes, args), baseline)]  # the baseline is measured once
    out = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}, "baseline": baseline,
           "shapes": results, "self_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(table(baseline + results))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
