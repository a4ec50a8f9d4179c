"""`pillsnap demo`: the whole job in one command on the embedded default (synthetic AI Hub data, CPU-sized).

generate data -> scan into manifests -> train classifier + detector (interleaved) -> validate -> export the
detector to ONNX -> evaluate the two-stage pipeline on held-out photos -> enrol the drugs held out of training from
5 photos each and answer their other photos -> print headline figures and paths.
Every phase is skipped when its output already exists, so a re-run reuses what is built.
"""

from __future__ import annotations

import argparse
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pillsnap.utils.locks import BusyError, file_lock

LOGGER = logging.getLogger("pillsnap.demo")

# Synthetic data and training sizes per profile. default: about 9 minutes on 2 CPU cores; tiny: about 1 minute.
# Each generates two classes more than the stage trains on: their pills are the "unknown pill" test. The default
# profile's photos are at half the real size (488 x 640): the classifier sees 64 px crops either way, but the imprint
# reader needs the pixels (at quarter size it read 75 % of look-alike twins apart, at half size 89 %). Both read the
# classifier's crops from the crop cache: decoding and cutting each photo at every step took 56 % of a step
# (bench/demo_crop_cache.py: the classifier's training 1.78x as fast). The default profile spends the time saved on
# 36 epochs instead of 20; the detector, which the cache does not speed up, trains them too. A peak learning rate of
# 4e-3 gave the classifier alone a better validation accuracy on each seed tried (bench/demo_classifier_recipe.py),
# but the whole demo's final answers came out no better (docs/BENCHMARKS.md), so the profile keeps 2e-3.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "synth": {"num_classes": 10, "per_class": 60, "combo": 120, "image_scale": 0.5},
        "overrides": [
            "data.progressive_validation.stage_1.max_classes=8",
            "model.backbone=resnet18", "model.image_size=64", "model.detector=yolo11n", "model.det_image_size=160",
            "data.cache.enabled=true", "train.epochs=36", "train.batch_size=32", "train.lr=2.0e-3",
            "train.warmup_steps=10",
            "train.detection.batch_size=8", "train.detection.lr=2.0e-3", "train.ema.decay=0.9",
            "train.step_log_interval=5", "train.early_stopping.patience=100", "dataloader.num_workers=0",
            "optimization.channels_last=false", "model.pretrained=false",
        ],
    },
    "tiny": {
        "synth": {"num_classes": 6, "per_class": 10, "combo": 12, "image_scale": 0.15},
        "overrides": [
            "data.progressive_validation.stage_1.max_classes=4",
            "data.cache.enabled=true", "model.backbone=test_efficientnet", "model.image_size=32",
            "model.detector=yolo11n", "model.det_image_size=96", "train.epochs=1", "train.batch_size=8",
            "train.lr=2.0e-3",
            "train.warmup_steps=2", "train.detection.batch_size=4", "train.max_steps_per_epoch=3",
            "train.ema.decay=0.5", "train.step_log_interval=1", "dataloader.num_workers=0",
            "optimization.channels_last=false", "model.pretrained=false",
            # a dozen calibration answers cannot certify 95 % sets (19 are needed): 80 % needs 4
            "inference.prediction_set.coverage=0.8",
        ],
    },
}
DATA_MARKER = "synth_summary.json"
DEMO_LOCK = "demo.lock"  # in --workdir: one demo at a time writes its data, manifests, cache and exp/


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="generate data, train both models, evaluate, report",
                                   description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a ~1 minute profile (tests, smoke checks)")
    parser.add_argument("--workdir", default="runs/demo", help="data, manifests and exp/ go here (default: runs/demo)")
    parser.add_argument("--data-root", default=None, help="a real AI Hub tree: scan it instead of generating data")
    parser.add_argument("--cfg", default="config.yaml", help="base config file (default: config.yaml)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra dotted config overrides")
    parser.set_defaults(func=run)


def demo_config(args: argparse.Namespace) -> Any:
    """Base config < profile overrides < paths under --workdir < the user's overrides.

    The default profile's sizes apply to generated data only (with --data-root, a real tree, the config's own models
    train); --tiny always means the tiny models, whatever the data. Both profiles start from random weights: the
    demo never waits on the network."""
    from pillsnap.config import load_config

    workdir = Path(args.workdir)
    profile = PROFILES["tiny" if args.tiny else "default"]
    paths = [f"paths.data_root={args.data_root or workdir / 'data'}", f"paths.manifest_dir={workdir / 'manifests'}",
             f"paths.exp_dir={workdir / 'exp'}", f"paths.cache_dir={workdir / 'cache'}"]
    overrides = list(profile["overrides"]) if args.tiny or not args.data_root else ["model.pretrained=false"]
    cfg_path = args.cfg if Path(args.cfg).is_file() else None
    return load_config(cfg_path, [*overrides, *paths, *args.overrides], dotenv_path=None)


def phase(name: str) -> None:
    LOGGER.info("\n=== %s ===", name)


def ensure_data(cfg: Any, args: argparse.Namespace) -> None:
    """Generate the synthetic set once (marker file), unless --data-root points at real data."""
    from pillsnap.data import generate_dataset
    from pillsnap.utils import save_json

    root = Path(cfg.paths.data_root)
    if args.data_root:
        if not root.exists():
            raise FileNotFoundError(f"--data-root {root} does not exist")
        LOGGER.info("data: using %s", root)
        return
    if (root / DATA_MARKER).is_file():
        LOGGER.info("data: reusing %s", root)
        return
    spec = PROFILES["tiny" if args.tiny else "default"]["synth"]
    _drop_derived(cfg, Path(args.workdir))
    LOGGER.info("data: generating %s under %s", spec, root)
    summary = generate_dataset(root, seed=int(cfg.train.seed), workers=1, **spec)
    save_json(root / DATA_MARKER, summary)


def _drop_derived(cfg: Any, workdir: Path) -> None:
    """New data makes what was made from the old data wrong without a sign: the manifests (boxes, splits) and the
    crop cache (keyed by label path, and the new photos have the old paths) are removed before it is generated.
    Only the demo's own folders (`manifests`, `cache` in the work directory, as configured and not links); one
    configured elsewhere, or a link, is named instead, and so is a trained experiment."""
    import shutil

    # the manifests are the generated data's only when their scan read it (check_workdir stopped at another's)
    scanned = _scanned_root(Path(cfg.paths.manifest_dir)) is not None
    for name, own in (("manifest_dir", workdir / "manifests"), ("cache_dir", workdir / "cache")):
        folder = Path(cfg.paths[name])
        if (folder.absolute() == own.absolute() and folder.is_dir() and not folder.is_symlink()
                and (scanned or not any(folder.iterdir()))):
            LOGGER.warning("data: removing %s, made from the data generated before", folder)
            shutil.rmtree(folder)
        elif folder.exists():
            LOGGER.warning("data: %s may hold what was made from the data generated before (paths.%s is not the "
                           "demo's own folder, or not known to be made from its data, so it is left): remove it if "
                           "so", folder, name)
    if (Path(cfg.paths.exp_dir) / "checkpoints").is_dir():
        LOGGER.warning("data: %s was trained on the data generated before: its figures will be of that data "
                       "(remove it to train on the new data)", cfg.paths.exp_dir)


def ensure_manifests(cfg: Any) -> dict:
    from pillsnap.data import scan_dataset
    from pillsnap.utils import read_json

    out = Path(cfg.paths.manifest_dir)
    if (out / "manifest.parquet").is_file() and (out / "scan_report.json").is_file():
        LOGGER.info("scan: reusing %s", out)
        return read_json(out / "scan_report.json")
    report = scan_dataset(cfg.paths.data_root, out, workers=int(cfg.data.scan_workers) or 1,
                          split_seed=int(cfg.data.split_seed), val_ratio=float(cfg.data.val_ratio),
                          test_ratio=float(cfg.data.test_ratio))
    LOGGER.info("scan: %d records kept, %d skipped -> %s", report["records_kept"], report["records_skipped"], out)
    return report


def training_done(exp_dir: Path) -> bool:
    from pillsnap.utils import read_json
    from pillsnap.utils.run_status import COMPLETED_STATUSES

    metrics = exp_dir / "reports" / "metrics.json"
    if not metrics.is_file() or not (exp_dir / "checkpoints" / "classification_best.pt").is_file():
        return False
    return read_json(metrics).get("status") in COMPLETED_STATUSES


def ensure_trained(cfg: Any) -> int:
    """Train unless a finished run is there; an interrupted run resumes from its last checkpoints."""
    from pillsnap.train import train

    exp_dir = Path(cfg.paths.exp_dir)
    if training_done(exp_dir):
        LOGGER.info("train: reusing the finished run in %s", exp_dir)
        return 0
    if (exp_dir / "checkpoints" / "classification_last.pt").is_file():
        cfg.train.resume = "last"
        LOGGER.info("train: resuming the interrupted run in %s", exp_dir)
    return train(cfg, assume_yes=True)  # the demo runs unattended: the advisor's first option is recorded


def ensure_calibrated(cfg: Any) -> None:
    """Calibrate the trained classifier unless a calibration fit for these very weights is there (training writes
    one; a run trained by an older PillSnap, or interrupted after training, may lack it), and the box check unless
    it was measured for this very detector."""
    from pillsnap.eval.box_calibration import refresh_box_check
    from pillsnap.eval.calibration import calibrate_classifier, load_manifest_if_any
    from pillsnap.infer.artefacts import load_calibration
    from pillsnap.utils.io import file_sha256

    ckpt_dir = Path(cfg.paths.exp_dir) / "checkpoints"
    calibration = load_calibration(ckpt_dir, ckpt_dir / "classification_best.pt")
    if calibration is None:
        calibrate_classifier(cfg, cfg.paths.exp_dir)
        return
    detector = ckpt_dir / "detection_best.pt"
    if detector.is_file() and (calibration.get("box_check") or {}).get("detector_sha256") != file_sha256(detector):
        refresh_box_check(cfg, cfg.paths.exp_dir, load_manifest_if_any(cfg))


def ensure_onnx(exp_dir: Path, device: str | None) -> Path | None:
    """Export detection_best.pt to {exp_dir}/export/detector.onnx (once)."""
    from pillsnap.models.detector import detector_settings, load_detector_for_inference
    from pillsnap.models.export import export_detector_onnx

    ckpt = exp_dir / "checkpoints" / "detection_best.pt"
    out = exp_dir / "export" / "detector.onnx"
    if not ckpt.is_file():
        return None
    if out.is_file() and out.stat().st_mtime >= ckpt.stat().st_mtime:
        return out
    model, snapshot = load_detector_for_inference(ckpt, device="cpu")
    return export_detector_onnx(model, out, detector_settings(snapshot)[1])


def enrolment_figures(cfg: Any, device: str | None, before: Any = None) -> dict | None:
    """The held-out drugs enrolled, measured and removed again (pillsnap.eval.enrol_eval); None when every drug was
    trained, {"skipped": why} (said in the log) when the run cannot enrol, e.g. it has no calibration to place the
    drugs in."""
    from pillsnap.eval.enrol_eval import evaluate_enrolment
    from pillsnap.infer.enrolment import EnrolmentError

    try:
        return evaluate_enrolment(cfg, device, before=before)
    except EnrolmentError as err:
        LOGGER.warning("enrolment: not measured: %s", err)
        return {"skipped": str(err)}


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import ConfigError

    start = time.perf_counter()
    try:
        cfg = demo_config(args)
        with ExitStack() as held:
            try:  # data, manifests and cache are shared too
                held.enter_context(file_lock(Path(args.workdir) / DEMO_LOCK, role="demo"))
            except BusyError as err:
                LOGGER.error("demo: %s: another demo is working in %s; wait for it, or give another --workdir", err,
                             args.workdir)
                return 2
            return _run(args, cfg, start)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        LOGGER.error("demo: %s", err)
        return 2


def _scanned_root(manifest_dir: Path) -> str | None:
    """The data root the scan in `manifest_dir` read (its report, or the state of one under way), None when none."""
    from pillsnap.utils import read_json

    for name in ("scan_report.json", "scan_state.json"):
        try:
            root = read_json(manifest_dir / name).get("data_root")
        except (OSError, ValueError, AttributeError):
            continue
        if root:
            return str(root)
    return None


def check_workdir(cfg: Any) -> None:
    """ValueError when the demo's folders hold another data set's work: a scan of other data in its manifest
    folder, or a run trained on other data in its experiment folder. The config's defaults are the demo's folders
    (runs/demo/...), so a real data set's scan and training land there unless moved; the demo regenerating its
    data deleted that scan and its crop cache, and evaluated a finished real run as its own."""
    from omegaconf import OmegaConf

    ours = str(Path(cfg.paths.data_root).resolve())
    manifests, exp = Path(cfg.paths.manifest_dir), Path(cfg.paths.exp_dir)
    scanned = _scanned_root(manifests)
    if scanned is not None and scanned != ours:
        raise ValueError(f"{manifests} holds a scan of {scanned}, not of the demo's data ({ours}): give the demo "
                         "another --workdir, or keep that data set's manifests elsewhere (paths.manifest_dir); if it "
                         "is an older demo's (a moved folder), remove it")
    try:
        trained = OmegaConf.select(OmegaConf.load(exp / "config.yaml"), "paths.data_root")
    except Exception:  # noqa: BLE001 - no run there yet, or a config that does not parse: nothing to compare
        trained = None
    if trained and str(Path(str(trained)).resolve()) != ours:
        raise ValueError(f"{exp} holds a run trained on {trained}, not on the demo's data ({ours}): give the demo "
                         "another --workdir, or keep that run elsewhere (paths.exp_dir)")


def _run(args: argparse.Namespace, cfg: Any, start: float) -> int:
    check_workdir(cfg)
    phase("1/6 data")
    ensure_data(cfg, args)
    phase("2/6 scan")
    ensure_manifests(cfg)
    phase("3/6 train (classifier + detector, interleaved)")
    code = ensure_trained(cfg)
    if code != 0:
        LOGGER.error("demo: training ended with exit code %d; see %s/logs", code, cfg.paths.exp_dir)
        return code
    ensure_calibrated(cfg)
    phase("4/6 export the detector to ONNX")
    onnx_path = ensure_onnx(Path(cfg.paths.exp_dir), args.device)
    phase("5/6 evaluate the pipeline on held-out photos")
    from pillsnap.eval.pipeline_report import evaluate_and_report, format_headline

    summary, auto = evaluate_and_report(cfg, onnx_path, args.device, start)
    phase("6/6 enrol the held-out drugs from 5 photos each (no retraining) and answer their other photos")
    summary["enrolment"] = enrolment_figures(cfg, args.device, auto)  # its "before" is the auto pass's answers
    # the whole demo's time, enrolment included (the summary written before enrolment has the time up to then)
    summary["elapsed_s"] = round(time.perf_counter() - start, 1)
    _add_to_summary(Path(cfg.paths.exp_dir), {key: summary[key] for key in ("enrolment", "elapsed_s")})
    print(format_headline(summary), flush=True)
    return 0


def _add_to_summary(exp_dir: Path, figures: dict) -> None:
    """Add `figures` to reports/demo_summary.json (written by the evaluation) in one atomic write."""
    from pillsnap.utils import read_json, save_json

    path = exp_dir / "reports" / "demo_summary.json"
    if path.is_file():
        save_json(path, {**read_json(path), **figures})
