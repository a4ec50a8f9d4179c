"""`pillsnap export --exp EXP`: the classifier and the detector to ONNX (dynamic batch) in {exp_dir}/export/, and a
parity report (parity.json): the same inputs through torch and onnxruntime, logits compared, boxes compared after
the shared NMS. export.json, which `inference.backend: onnx` needs, is written only when parity holds.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("pillsnap.export")
# Float32 through two runtimes: kernels differ in summation order, so logits agree to ~1e-5 and boxes to a
# fraction of a pixel. These bounds are far above that noise and far below a real mismatch.
MAX_LOGIT_DIFF, MAX_BOX_DIFF_PX = 1e-2, 1.0
MAX_FEATURE_DIFF = 1e-3  # relative to the largest feature: the unknown-pill distances must agree too


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export the classifier and detector to ONNX (+ parity report)",
                                   description=__doc__)
    parser.add_argument("--exp", default=None, help="experiment directory (default: paths.exp_dir of the config)")
    parser.add_argument("--cfg", default=None, help="config file (default: EXP/config.yaml, else ./config.yaml)")
    parser.add_argument("--images", nargs="*", default=None, metavar="IMAGE",
                        help="photos for the parity check (default: validation photos from the manifest, else noise)")
    parser.add_argument("--samples", type=int, default=8, help="photos (or noise images) in the parity check")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import load_cli_config

    cfg = load_cli_config(args.exp, args.cfg, args.overrides)
    exp_dir = Path(cfg.paths.exp_dir)
    report = export_experiment(exp_dir, cfg, args.images, args.samples, args.opset)
    for role in ("classifier", "detector"):
        if report.get(role):
            LOGGER.info("export: %s %s", role, _summary(report[role]))
    if not report["ok"]:
        LOGGER.error("export: torch and ONNX disagree (see %s); export.json not written, so inference.backend=onnx "
                     "stays off for this experiment", report["path"])
        return 1
    LOGGER.info("export: parity ok; %s holds the models, parity.json the report", report["path"].parent)
    return 0


def _summary(entry: dict) -> str:
    figures = {k: v for k, v in entry.items() if k in ("max_abs_logit_diff", "top1_agreement", "max_abs_raw_diff",
                                                        "same_boxes", "ok")}
    return ", ".join(f"{k}={v}" for k, v in figures.items())


def export_experiment(exp_dir: Path, cfg: Any, images: list[str] | None = None, samples: int = 8,
                      opset: int = 17) -> dict:
    """Export both models, check parity, write parity.json (always) and export.json (when parity holds)."""
    from pillsnap.infer.artefacts import find_checkpoints
    from pillsnap.models.export import EXPORT_DIR, EXPORT_META, PARITY_REPORT
    from pillsnap.utils import ensure_dir, save_json

    cls_path, det_path = find_checkpoints(exp_dir)
    out_dir = ensure_dir(exp_dir / EXPORT_DIR)
    (out_dir / EXPORT_META).unlink(missing_ok=True)  # a failed export must not leave the old metadata in force
    photos, source = _parity_photos(cfg, images, samples)
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "opset": opset,
            "classifier": _export_classifier(cls_path, out_dir, opset),
            "detector": _export_detector(det_path, out_dir, opset) if det_path else None}
    parity = {"inputs": source, "classifier": classifier_parity(out_dir, meta["classifier"], photos, samples)}
    if meta["detector"]:
        parity["detector"] = detector_parity(out_dir, meta["detector"], photos, samples, cfg.inference)
    parity["ok"] = all(parity[r]["ok"] for r in ("classifier", "detector") if r in parity)
    save_json(out_dir / PARITY_REPORT, parity)
    if parity["ok"]:
        save_json(out_dir / EXPORT_META, meta)
    return {**parity, "path": out_dir / PARITY_REPORT}


def _export_classifier(ckpt: Path, out_dir: Path, opset: int) -> dict:
    from pillsnap.models.classifier import load_classifier_for_inference
    from pillsnap.models.export import CLASSIFIER_ONNX, export_classifier_onnx, file_sha256

    model, snapshot = load_classifier_for_inference(ckpt, device="cpu")
    size = int(snapshot["model"]["image_size"])
    onnx_path = export_classifier_onnx(model, out_dir / CLASSIFIER_ONNX, size, opset)
    return {"file": CLASSIFIER_ONNX, "checkpoint": ckpt.name, "checkpoint_sha256": file_sha256(ckpt),
            "onnx_sha256": file_sha256(onnx_path), "image_size": size, "backbone": snapshot["model"]["backbone"],
            "num_classes": int(snapshot["model"]["num_classes"]),
            "crop_margin": float(snapshot.get("data", {}).get("crop_margin", 0.15))}


def _export_detector(ckpt: Path, out_dir: Path, opset: int) -> dict:
    from pillsnap.models.detector import detector_settings, load_detector_for_inference
    from pillsnap.models.export import DETECTOR_ONNX, export_detector_onnx, file_sha256

    model, snapshot = load_detector_for_inference(ckpt, device="cpu")
    name, size = detector_settings(snapshot)
    onnx_path = export_detector_onnx(model, out_dir / DETECTOR_ONNX, size, opset)
    return {"file": DETECTOR_ONNX, "checkpoint": ckpt.name, "checkpoint_sha256": file_sha256(ckpt),
            "onnx_sha256": file_sha256(onnx_path), "image_size": size, "model": name}


def _parity_photos(cfg: Any, images: list[str] | None, samples: int) -> tuple[list, str]:
    """Photos to compare the runtimes on: the given files, else validation photos of the manifest, as many single
    as combination photos drawn at random (the detector finds real pills, the classifier sees both kinds), else
    none (seeded noise is used)."""
    from pillsnap.utils.images import read_image

    if images:
        return [read_image(p) for p in images[:samples]], "given images"
    manifest = Path(cfg.paths.manifest_dir) / "manifest.parquet"
    if manifest.is_file():
        import pandas as pd

        from pillsnap.data.stages import sample_by_kind

        frame = pd.read_parquet(manifest, columns=["image_path", "split", "image_type"])
        frame = frame[frame["split"] == "val"].drop_duplicates("image_path")
        paths = list(sample_by_kind(frame, samples, int(cfg.train.seed))[0]["image_path"])  # both kinds
        if paths:
            return [read_image(p) for p in paths], f"{len(paths)} validation photos from {manifest}"
    return [], "seeded noise (no photos given and no manifest)"


def _inputs(photos: list, samples: int, size: int, to_tensor: Any) -> Any:
    import torch

    if photos:
        return torch.cat([to_tensor(p) for p in photos])
    return torch.rand(samples, 3, size, size, generator=torch.Generator().manual_seed(0))


def classifier_parity(out_dir: Path, entry: dict, photos: list, samples: int) -> dict:
    """Logits of the checkpoint and of classifier.onnx on the same crops, one by one and as one batch, and the
    features the unknown-pill rule measures (relative to their largest magnitude)."""
    import torch

    from pillsnap.data import classification_transform
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference
    from pillsnap.models.export import OnnxClassifier

    model, _ = load_classifier_for_inference(out_dir.parent / "checkpoints" / entry["checkpoint"], device="cpu")
    transform = classification_transform(entry["image_size"], train=False)
    x = _inputs(photos, samples, entry["image_size"], lambda p: transform(p).unsqueeze(0))
    onnx = OnnxClassifier(out_dir / entry["file"])
    with torch.no_grad():
        ref, ref_features = (out.float() for out in WithFeatures(model).eval()(x))
    (batched, features), single = onnx(x), torch.cat([onnx(x[i:i + 1])[0] for i in range(len(x))])
    diff = max(float((batched - ref).abs().max()), float((single - ref).abs().max()))
    agree = float((batched.argmax(-1) == ref.argmax(-1)).float().mean())
    feature_diff = None if features is None else float(
        (features - ref_features).abs().max() / ref_features.abs().max().clamp_min(1e-6))
    return {"inputs": len(x), "batch_sizes": [1, len(x)], "max_abs_logit_diff": diff, "top1_agreement": agree,
            "max_abs_logit": float(ref.abs().max()), "max_rel_feature_diff": feature_diff,
            "ok": diff <= MAX_LOGIT_DIFF and agree == 1.0 and feature_diff is not None
            and feature_diff <= MAX_FEATURE_DIFF}


def detector_parity(out_dir: Path, entry: dict, photos: list, samples: int, settings: Any) -> dict:
    """Boxes of the checkpoint and of detector.onnx after the shared NMS, at the configured confidence and at a
    lower one that keeps a few boxes per image even for a weak detector (so that 'same boxes' is not vacuous)."""
    import numpy as np
    import torch

    from pillsnap.infer.preprocess import letterbox
    from pillsnap.models.detector import load_detector_for_inference, raw_detector_output
    from pillsnap.models.export import OnnxDetector

    model, _ = load_detector_for_inference(out_dir.parent / "checkpoints" / entry["checkpoint"], device="cpu")
    x = _inputs(photos, samples, entry["image_size"], lambda p: letterbox(p, entry["image_size"])[0])
    with torch.no_grad():
        raw_torch = raw_detector_output(model, x).float()
    raw_onnx = OnnxDetector(out_dir / entry["file"])(x)
    probe = min(float(settings.conf_threshold), float(np.quantile(raw_torch[:, 4:].amax(1).numpy(), 0.995)))
    result = {"inputs": len(x), "max_abs_raw_diff": float(np.abs(raw_onnx - raw_torch.numpy()).max())}
    checks = {f"conf_{c:g}": compare_boxes(raw_torch, raw_onnx, c, float(settings.iou_threshold))
              for c in sorted({float(settings.conf_threshold), round(probe, 4)})}
    return {**result, "thresholds": checks, "same_boxes": all(c["same_boxes"] for c in checks.values()),
            "ok": all(c["same_boxes"] for c in checks.values())}


def compare_boxes(raw_a: Any, raw_b: Any, conf: float, iou: float) -> dict:
    """Run both raw outputs through the one NMS and compare the kept boxes image by image."""
    from pillsnap.models.detector import postprocess_detections

    dets_a, dets_b = postprocess_detections(raw_a, conf, iou), postprocess_detections(raw_b, conf, iou)
    same_counts = all(len(a) == len(b) for a, b in zip(dets_a, dets_b, strict=True))
    box_diff = max((float((a[:, :4] - b[:, :4]).abs().max()) for a, b in zip(dets_a, dets_b, strict=True)
                    if same_counts and len(a)), default=0.0)
    return {"boxes_torch": sum(len(d) for d in dets_a), "boxes_onnx": sum(len(d) for d in dets_b),
            "max_box_diff_px": box_diff, "same_boxes": same_counts and box_diff <= MAX_BOX_DIFF_PX}
