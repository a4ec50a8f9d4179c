"""ONNX export of the detector and the shared NMS: torch and onnxruntime give the same boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import fake_det_batch
from test_detection_task import tiny_cfg

from pillsnap.engine.detection import DetectionTask, prepare_batch, validate_detection
from pillsnap.models.detector import postprocess_detections, raw_detector_output
from pillsnap.models.export import OnnxDetector, export_detector_onnx


@pytest.fixture(scope="module")
def trained_task() -> DetectionTask:
    """A yolo11n trained a little on fake pills, so that NMS keeps real-looking boxes."""
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    train = [fake_det_batch(rng, 4) for _ in range(3)]
    val = [fake_det_batch(rng, 4) for _ in range(2)]
    task = DetectionTask(tiny_cfg("train.ema.enabled=false", "train.detection.lr=0.003"), train, val, "cpu")
    for _ in range(2):
        for batch in train:
            task.train_step(batch)
    return task.model.eval()


def test_torch_and_onnx_give_the_same_boxes(trained_task, tmp_path) -> None:
    model = trained_task
    path = export_detector_onnx(model, tmp_path / "export" / "detector.onnx", image_size=64)
    onnx = OnnxDetector(path)
    images = prepare_batch(fake_det_batch(np.random.default_rng(5), 3), torch.device("cpu"))["img"]
    with torch.no_grad():
        raw_torch = raw_detector_output(model, images)
    raw_onnx = onnx(images)
    assert raw_onnx.shape == tuple(raw_torch.shape)  # dynamic batch of 3 through a graph traced at 1
    np.testing.assert_allclose(raw_onnx, raw_torch.numpy(), atol=1e-3, rtol=1e-3)
    conf = float(np.quantile(raw_onnx[:, 4, :], 0.98))  # keep a handful of candidates per image
    dets_torch = postprocess_detections(raw_torch, conf, 0.6)
    dets_onnx = postprocess_detections(raw_onnx, conf, 0.6)
    assert sum(len(d) for d in dets_torch) > 0
    for a, b in zip(dets_torch, dets_onnx, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-3)


def test_validation_metrics_match_between_torch_and_onnx(trained_task, tmp_path) -> None:
    model = trained_task
    onnx = OnnxDetector(export_detector_onnx(model, tmp_path / "d.onnx", image_size=64))
    val = [fake_det_batch(np.random.default_rng(7), 4) for _ in range(2)]
    device = torch.device("cpu")
    m_torch = validate_detection(model, val, device, 0.001, 0.6)
    m_onnx = validate_detection(onnx, val, device, 0.001, 0.6)
    assert m_torch["num_targets"] == m_onnx["num_targets"] > 0
    for key in ("mAP@0.5", "mAP@0.5:0.95", "precision", "recall"):
        assert m_onnx[key] == pytest.approx(m_torch[key], abs=1e-3)


def test_postprocess_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="raw detector output"):
        postprocess_detections(torch.zeros(5, 10), 0.1, 0.5)


def test_missing_onnx_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="ONNX detector not found"):
        OnnxDetector(tmp_path / "none.onnx")
