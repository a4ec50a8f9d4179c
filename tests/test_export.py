"""`pillsnap export` on a tiny experiment: ONNX for both models with a dynamic batch, the parity report, and
`inference.backend: onnx` giving the torch backend's answers through Predictor, `pillsnap predict` and the API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from fastapi.testclient import TestClient
from test_infer_pipeline import CODES, make_exp_dir, pill_photo

from pillsnap.cli import main as cli_main
from pillsnap.config import load_config
from pillsnap.infer import export as export_cmd
from pillsnap.infer.pipeline import Predictor
from pillsnap.serve.app import create_app
from pillsnap.serve.cli import build_service
from pillsnap.utils import save_json
from pillsnap.utils.io import file_sha256


def cfg_for(exp_dir: Path, *overrides: str):
    return load_config("config.yaml", [f"paths.exp_dir={exp_dir}", f"paths.manifest_dir={exp_dir / 'none'}",
                                       "inference.hard_cases.enabled=false", *overrides], dotenv_path=None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny experiment (classes with EDI codes) exported once through the command line."""
    exp_dir = make_exp_dir(tmp_path_factory.mktemp("exp"))
    save_json(exp_dir / "checkpoints" / "classes.json", {"class_names": CODES, "class_map": {
        c: {"name": f"drug {i}", "edi_codes": [f"64{i}000010"]} for i, c in enumerate(CODES)}})
    code = cli_main(["export", "--exp", str(exp_dir), "--samples", "4", "--set", f"paths.manifest_dir={exp_dir}/no"])
    assert code == 0
    return exp_dir


def test_export_writes_both_models_with_dynamic_batch_and_parity(exported: Path) -> None:
    export_dir = exported / "export"
    meta = json.loads((export_dir / "export.json").read_text())
    parity = json.loads((export_dir / "parity.json").read_text())
    for role, ckpt in (("classifier", "classification_best.pt"), ("detector", "detection_best.pt")):
        model = onnx.load(str(export_dir / meta[role]["file"]))
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert meta[role]["checkpoint_sha256"] == file_sha256(exported / "checkpoints" / ckpt)
    assert parity["ok"] and parity["classifier"]["top1_agreement"] == 1.0
    assert parity["classifier"]["max_abs_logit_diff"] < 1e-3 and parity["classifier"]["batch_sizes"] == [1, 4]
    assert parity["classifier"]["max_rel_feature_diff"] < 1e-4  # the features output the unknown rule reads
    checks = parity["detector"]["thresholds"]
    assert parity["detector"]["same_boxes"] and any(c["boxes_torch"] > 0 for c in checks.values())


def test_onnx_backend_answers_like_torch(exported: Path, tmp_path: Path) -> None:
    photo = pill_photo(tmp_path / "two.png", [(10, 10, 30, 24), (70, 100, 30, 24)])
    answers = {}
    for backend in ("torch", "onnx"):
        predictor = Predictor(exported, cfg_for(exported, f"inference.backend={backend}"), device="cpu")
        answers[backend] = predictor.predict(photo, mode="combo", conf_threshold=0.001)
    torch_pills, onnx_pills = answers["torch"]["pills"], answers["onnx"]["pills"]
    assert len(torch_pills) == len(onnx_pills) > 0
    for a, b in zip(torch_pills, onnx_pills, strict=True):
        assert a["bbox"] == b["bbox"] and a["mapping_code"] == b["mapping_code"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    assert onnx_pills[0]["edi_codes"][0].startswith("64")
    assert predictor.model_files()["classifier"].name == "classifier.onnx"
    from pillsnap.serve.service import describe_models

    assert describe_models(predictor)["onnx_providers"] == ["CPUExecutionProvider"]  # what /version says it runs on


def test_onnx_backend_without_export_names_the_command(tmp_path: Path) -> None:
    exp_dir = make_exp_dir(tmp_path / "exp")
    with pytest.raises(FileNotFoundError, match="pillsnap export --exp"):
        Predictor(exp_dir, cfg_for(exp_dir, "inference.backend=onnx"), device="cpu")
    assert cli_main(["predict", str(pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])), "--exp", str(exp_dir),
                     "--set", "inference.backend=onnx"]) == 2


def test_stale_export_is_refused(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "exp"
    shutil.copytree(exported, copy)
    ckpt = copy / "checkpoints" / "classification_best.pt"
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # a retrained checkpoint, as far as the checksum can tell
    with pytest.raises(ValueError, match="changed since.*pillsnap export"):
        Predictor(copy, cfg_for(copy, "inference.backend=onnx"), device="cpu")


def test_failed_parity_keeps_the_onnx_backend_off(exported: Path, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "exp"
    shutil.copytree(exported, copy)
    monkeypatch.setattr(export_cmd, "MAX_LOGIT_DIFF", -1.0)  # nothing can pass
    assert cli_main(["export", "--exp", str(copy), "--samples", "2", "--set", f"paths.manifest_dir={copy}/no"]) == 1
    assert not (copy / "export" / "export.json").exists()
    assert json.loads((copy / "export" / "parity.json").read_text())["ok"] is False


def test_predict_cli_and_api_on_the_onnx_backend(exported: Path, tmp_path: Path, capsys) -> None:
    photo = pill_photo(tmp_path / "one.png", [(45, 60, 30, 24)])
    assert cli_main(["predict", str(photo), "--exp", str(exported), "--mode", "single", "--json",
                     "--set", "inference.backend=onnx"]) == 0
    cli_answer = json.loads(capsys.readouterr().out)[0]
    service = build_service(exported, cfg_for(exported, "inference.backend=onnx"), "cpu")
    service.setup()
    with TestClient(create_app(service)) as client:
        resp = client.post("/v1/predict", files={"file": ("one.png", photo.read_bytes(), "image/png")},
                           data={"mode": "single"})
        version = client.get("/version").json()
    assert resp.status_code == 200
    assert resp.json()["pills"][0]["mapping_code"] == cli_answer["pills"][0]["mapping_code"]
    assert version["backend"] == "onnx" and version["models"]["classifier"]["file"] == "classifier.onnx"
    assert version["models"]["detector"]["sha256"] == file_sha256(exported / "export" / "detector.onnx")


def test_an_onnx_backend_asked_for_cuda_without_a_cuda_onnxruntime_says_it_runs_on_the_cpu(monkeypatch, caplog):
    """The `onnxruntime` wheel has no CUDA provider: asked for cuda, the ONNX models run on the CPU, and the log says
    so (before: silently, while /version said cuda)."""
    import onnxruntime as ort

    from pillsnap.models.export import onnx_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("cuda:0") == ["CPUExecutionProvider"]
    assert "no CUDA provider" in caplog.text and "onnxruntime-gpu" in caplog.text
    caplog.clear()
    assert onnx_providers("cpu") == ["CPUExecutionProvider"] and not caplog.text
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"] and not caplog.text
