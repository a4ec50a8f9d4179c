"""The detector's pretrained weights: ultralytics' COCO `{model}.pt` by default, never a wait when offline."""

from __future__ import annotations

from pathlib import Path

import torch

from pillsnap.models.detector import build_yolo_model


def test_pretrained_detector_offline_starts_from_random_init_without_asking(monkeypatch, caplog):
    from ultralytics.utils import downloads

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted although HF_HUB_OFFLINE is set")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the test suite and the demo run
    monkeypatch.setattr(downloads, "attempt_download_asset", no_download)
    model = build_yolo_model("yolo11n", num_classes=1, pretrained=True)
    assert model.names == {0: "pill"}
    assert "could not fetch yolo11n.pt (offline: HF_HUB_OFFLINE is set" in caplog.text


def test_pretrained_detector_loads_the_models_own_coco_weights(monkeypatch, tmp_path):
    from ultralytics.utils import downloads

    coco = build_yolo_model("yolo11n", num_classes=80)
    torch.save({"model": coco}, tmp_path / "yolo11n.pt")
    asked = []

    def download(name, *args, **kwargs):
        asked.append(name)
        return str(tmp_path / "yolo11n.pt")

    monkeypatch.setattr("pillsnap.models.detector.offline_reason", lambda url: None)  # as if online
    monkeypatch.setattr(downloads, "attempt_download_asset", download)
    model = build_yolo_model("yolo11n", num_classes=1, pretrained=True)
    from ultralytics.utils import SETTINGS

    # Into ultralytics' weights folder, where a run started from any directory finds it next time.
    assert asked == [str(Path(SETTINGS["weights_dir"]) / "yolo11n.pt")]
    first = next(iter(coco.state_dict()))
    assert torch.equal(model.state_dict()[first], coco.state_dict()[first])
