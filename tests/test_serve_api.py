"""The HTTP API through FastAPI's TestClient with a stand-in predictor: every endpoint, auth, body limits, errors,
request ids, metrics, the worker pool and background loading. (Photo edge cases: test_serve_inputs.py; a real
server on a socket: test_serve_http.py; real models: test_export.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pillsnap.config import ConfigError, load_config
from pillsnap.infer.hard_cases import KeptFiles
from pillsnap.serve.app import create_app
from pillsnap.serve.auth import KeyChecker, resolve_api_key
from pillsnap.serve.service import PredictionService
from pillsnap.serve.settings import ServeSettings
from pillsnap.utils.images import ImageLimits

KEY = {"X-API-Key": "k"}


class FakePredictor:
    """Stands in for pillsnap.infer.Predictor: records what it was given; `gate` holds each prediction until set."""

    backend, device, class_names, has_detector = "torch", "cpu", ["K-000001", "K-000002"], True

    def __init__(self, files: dict[str, Path] | None = None, gate: threading.Event | None = None,
                 hard_case: list[str] | None = None, fail: Exception | None = None) -> None:
        self.files, self.gate, self.hard_case, self.fail = files or {}, gate, hard_case or [], fail
        self.seen: list[dict] = []

    def warm_up(self) -> None:
        pass

    def model_files(self) -> dict[str, Path]:
        return self.files

    def predict(self, image: Image.Image, mode=None, conf_threshold=None, name=None, hints=None) -> dict:
        self.seen.append({"size": image.size, "mode": mode, "name": name, "pixels": np.asarray(image), "hints": hints})
        if self.gate is not None:
            assert self.gate.wait(timeout=60), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        pill = {"bbox": [0, 0, image.width, image.height], "det_confidence": None, "mapping_code": "K-000001",
                "name": "drug 0", "edi_codes": ["A123"], "probability": 0.9,
                "topk": [{"mapping_code": "K-000001", "name": "drug 0", "edi_codes": ["A123"], "probability": 0.9}]}
        return {"image": name, "mode": mode, "mode_used": "combo" if mode == "combo" else "single",
                "fallback_reason": None, "gating_score": 0.9, "single_confidence": 0.9, "num_pills": 1,
                "pills": [pill], "image_size": list(image.size), "elapsed_ms": 1.0, "hard_case": self.hard_case}


def png_bytes(size=(64, 48), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def photo(name: str = "a.png", data: bytes | None = None) -> dict:
    return {"file": (name, png_bytes() if data is None else data, "image/png")}


def make_app(predictor: FakePredictor | None = None, api_key: str | None = "k", ready: bool = True,
             uploads_dir: Path | None = None, **settings):
    predictor = predictor or FakePredictor()
    service = PredictionService(lambda: predictor, ImageLimits(min_side=32), uploads_dir and KeptFiles(uploads_dir))
    if ready:
        service.setup()
    return create_app(service, ServeSettings(**settings), api_key=api_key)


@pytest.fixture
def fake() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def client(fake):
    with TestClient(make_app(fake, max_upload_mb=0.05)) as test_client:
        yield test_client


def test_health_ready_and_version(tmp_path) -> None:
    weights = tmp_path / "classification_best.pt"
    weights.write_bytes(b"weights")
    with TestClient(make_app(FakePredictor({"classifier": weights}))) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json() == {"ready": True, "detail": "models loaded"}
        version = client.get("/version").json()
    assert version["package"] == "pillsnap" and version["version"] and version["git_sha"]
    assert version["num_classes"] == 2 and version["backend"] == "torch" and version["calibration"] is None
    assert version["prediction_set"] is None and version["box_check"] == {"active": False}  # nothing calibrated
    assert version["onnx_providers"] is None  # the torch backend
    assert version["models"]["classifier"] == {"file": weights.name, "bytes": 7,
                                               "sha256": hashlib.sha256(b"weights").hexdigest()}


def test_predict_v1_answers_with_request_id_and_the_unknown_flag(client, fake) -> None:
    resp = client.post("/v1/predict", files=photo(), data={"mode": "combo"}, headers=KEY)
    assert resp.status_code == 200
    body = resp.json()
    assert body["request_id"] == resp.headers["x-request-id"] and body["filename"] == "a.png"
    assert body["mode_used"] == "combo" and fake.seen[-1]["mode"] == "combo"
    pill = body["pills"][0]
    assert pill["bbox"] == [0, 0, 64, 48] and pill["edi_codes"] == ["A123"]
    assert pill["unknown"] is False and pill["unknown_reason"] is None  # the schema's defaults when not given
    assert "image" not in body  # the server-side name of the upload is not echoed


def test_hints_reach_the_predictor_and_an_unknown_word_is_a_422(client, fake) -> None:
    resp = client.post("/v1/predict", files=photo(), data={"imprint": "BSP", "color": "white", "shape": "round"},
                       headers=KEY)
    assert resp.status_code == 200
    hints = fake.seen[-1]["hints"]
    assert hints.imprint == "BSP" and hints.colors and hints.shape  # parsed to the labels' vocabulary
    bad = client.post("/v1/predict", files=photo(), data={"color": "plaid"}, headers=KEY)
    assert bad.status_code == 422 and bad.json()["error"] == "bad_hint" and "plaid" in bad.json()["detail"]
    client.post("/v1/predict", files=photo(), headers=KEY)
    assert fake.seen[-1]["hints"] is None  # no hint given: none passed on


def test_legacy_predict_still_works(client) -> None:
    resp = client.post("/predict", files=photo(), headers=KEY)
    assert resp.status_code == 200 and resp.json()["mode_used"] == "single"


def test_batch_answers_each_file_and_isolates_bad_ones(fake) -> None:
    files = [("files", ("good.png", png_bytes(), "image/png")), ("files", ("junk.png", b"junk", "image/png")),
             ("files", ("dot.png", png_bytes((1, 1)), "image/png")), ("files", ("empty.png", b"", "image/png"))]
    with TestClient(make_app(fake, max_batch_files=4)) as client:
        resp = client.post("/v1/predict/batch", files=files, headers=KEY)
        too_many = client.post("/v1/predict/batch", files=files + files[:1], headers=KEY)
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [r["filename"] for r in results] == ["good.png", "junk.png", "dot.png", "empty.png"]
    assert results[0]["pills"] and results[0]["request_id"] == resp.json()["request_id"]
    assert [(r.get("status"), r.get("error")) for r in results[1:]] == [
        (400, "image_unreadable"), (422, "image_too_small"), (400, "empty_upload")]
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_files"


class CrashOnName(FakePredictor):
    def predict(self, image: Image.Image, mode=None, conf_threshold=None, name=None, hints=None) -> dict:
        if name == "crash.png":
            raise RuntimeError("a bug the photo exposed")
        return super().predict(image, mode, conf_threshold, name, hints)


def test_one_photo_that_breaks_the_model_costs_the_batch_nothing(caplog) -> None:
    files = [("files", ("crash.png", png_bytes(), "image/png")), ("files", ("good.png", png_bytes(), "image/png"))]
    with TestClient(make_app(CrashOnName())) as client:
        resp = client.post("/v1/predict/batch", files=files, headers=KEY)
    assert resp.status_code == 200
    crash, good = resp.json()["results"]
    assert (crash["filename"], crash["status"], crash["error"]) == ("crash.png", 500, "internal_error")
    assert "a bug" not in crash["detail"] and resp.json()["request_id"] in crash["detail"]
    assert good["filename"] == "good.png" and good["pills"]
    assert any(r.exc_info and "a bug the photo exposed" in str(r.exc_info[1]) for r in caplog.records)


def test_auth_missing_wrong_bearer_and_public_paths(client) -> None:
    missing = client.post("/v1/predict", files=photo())
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert missing.json()["request_id"] == missing.headers["x-request-id"]
    assert client.post("/v1/predict", files=photo(), headers={"X-API-Key": "K"}).status_code == 401
    assert client.post("/v1/predict", files=photo(), headers={"Authorization": "Bearer k"}).status_code == 200
    for path in ("/", "/docs", "/openapi.json", "/health", "/ready", "/version", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_no_key_means_no_auth() -> None:
    with TestClient(make_app(api_key=None)) as client:
        assert client.post("/v1/predict", files=photo()).status_code == 200


def test_unauthenticated_request_body_is_never_read() -> None:
    """Called as ASGI directly: a refused request must not pull a single body message."""
    app, pulled, sent = make_app(ready=False), [], []

    async def receive() -> dict:
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
             "headers": [(b"transfer-encoding", b"chunked"), (b"content-type", b"multipart/form-data; boundary=b")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and pulled == []


def test_digit_only_key_stays_a_string(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PILLSNAP_API_KEY", raising=False)
    serving = load_config("config.yaml", dotenv_path=None).serving
    assert resolve_api_key(serving, environ={"PILLSNAP_API_KEY": "123456"}, dotenv_path=None) == "123456"
    (tmp_path / ".env").write_text("PILLSNAP_API_KEY=000123\n")
    assert resolve_api_key(serving, environ={}, dotenv_path=tmp_path / ".env") == "000123"  # leading zeros kept
    key_file = tmp_path / "key"
    key_file.write_text("123456\n")
    key_file.chmod(0o600)
    from_file = load_config("config.yaml", [f"serving.api_key_file={key_file}"], dotenv_path=None).serving
    assert resolve_api_key(from_file, environ={}, dotenv_path=None) == "123456"
    as_number = load_config("config.yaml", ["serving.api_key=123456"], dotenv_path=None).serving
    with pytest.raises(ConfigError, match="serving.api_key must be a string.*PILLSNAP_API_KEY"):
        resolve_api_key(as_number, environ={}, dotenv_path=None)
    with TestClient(make_app(api_key="123456")) as client:
        assert client.post("/v1/predict", files=photo(), headers={"X-API-Key": "123456"}).status_code == 200
        assert client.post("/v1/predict", files=photo(), headers={"X-API-Key": "12345"}).status_code == 401


def test_key_checker_needs_the_exact_key() -> None:
    checker = KeyChecker("s3cret")
    assert checker.allows({"x-api-key": "s3cret"}) and not checker.allows({"x-api-key": "s3cre"})
    assert not checker.allows({}) and not checker.allows({"authorization": "Basic s3cret"})
    assert KeyChecker(None).allows({}) and not KeyChecker(None).enabled


def test_declared_and_streamed_oversize_bodies_get_413(client) -> None:
    big = b"\x89PNG" + b"0" * 200_000
    declared = client.post("/v1/predict", files=photo("big.png", big), headers=KEY)
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"

    def chunks():  # a generator body goes out chunked, with no Content-Length to trust
        for _ in range(50):
            yield b"0" * 10_000

    streamed = client.post("/v1/predict", content=chunks(),
                           headers={**KEY, "Content-Type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and "MiB" in streamed.json()["detail"]
    assert client.post("/v1/predict", files=photo(), headers=KEY).status_code == 200  # still serving


def test_errors_are_json_with_request_ids(client) -> None:
    bad_mode = client.post("/v1/predict", files=photo(), data={"mode": "magic"}, headers=KEY)
    assert bad_mode.status_code == 422 and bad_mode.json()["detail"].startswith("mode:")
    no_file = client.post("/v1/predict", data={"mode": "auto"}, headers=KEY)
    assert no_file.status_code == 422 and "file" in no_file.json()["detail"]
    missing = client.get("/nowhere", headers=KEY)
    assert missing.status_code == 404 and set(missing.json()) == {"detail", "error", "request_id"}
    echoed = client.get("/health", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    replaced = client.get("/health", headers={"X-Request-ID": "<script>" + "x" * 80}).headers["x-request-id"]
    assert len(replaced) == 32 and "<" not in replaced  # junk ids are replaced, not echoed


def test_internal_errors_are_500_json_without_traceback() -> None:
    predictor = FakePredictor(fail=RuntimeError("boom at 0xdeadbeef"))
    with TestClient(make_app(predictor), raise_server_exceptions=False) as client:
        resp = client.post("/v1/predict", files=photo(), headers=KEY)
    assert resp.status_code == 500 and resp.json()["error"] == "internal_error"
    assert resp.json()["request_id"] in resp.json()["detail"] and "boom" not in resp.text


def test_metrics_count_requests_by_route_and_status(client) -> None:
    client.get("/health")
    client.post("/v1/predict", files=photo(), headers=KEY)
    client.post("/v1/predict", files=photo())
    text = client.get("/metrics").text
    assert 'pillsnap_http_requests_total{method="GET",route="/health",status="200"} 1.0' in text
    assert 'pillsnap_http_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'pillsnap_http_requests_total{method="POST",route="/v1/predict",status="401"} 1.0' in text
    assert 'pillsnap_http_request_duration_seconds_bucket{le="0.005",route="/health"}' in text
    assert 'pillsnap_predictions_total{mode_used="single"} 1.0' in text
    assert "pillsnap_http_requests_in_flight 1.0" in text  # the /metrics request itself
    assert "pillsnap_models_ready 1.0" in text


def _post_in_thread(client: TestClient, results: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(client.post("/v1/predict", files=photo(), headers=KEY)))
    thread.start()
    return thread


def _wait_for(condition, what: str) -> None:
    event = threading.Event()
    for _ in range(600):
        if condition():
            return
        event.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_health_answers_and_queue_is_bounded_while_predictions_run() -> None:
    gate = threading.Event()
    app = make_app(FakePredictor(gate=gate), workers=2, max_queue=3)
    runner = app.state.pillsnap.runner
    with TestClient(app) as client:
        results: list = []
        threads = [_post_in_thread(client, results) for _ in range(3)]
        try:
            _wait_for(lambda: runner.jobs == 3, "3 predictions in flight")
            assert client.get("/health").status_code == 200  # the event loop is free: models run in workers
            assert "pillsnap_inference_jobs 3.0" in client.get("/metrics").text
            busy = client.post("/v1/predict", files=photo(), headers=KEY)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["error"] == "busy"
        finally:
            gate.set()
            for thread in threads:
                thread.join(timeout=60)
    assert [r.status_code for r in results] == [200, 200, 200]


def test_models_load_in_the_background() -> None:
    gate = threading.Event()

    def slow_load() -> FakePredictor:
        assert gate.wait(timeout=60)
        return FakePredictor()

    service = PredictionService(slow_load, ImageLimits())
    with TestClient(create_app(service, api_key=None)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503
        loading = client.post("/v1/predict", files=photo())
        assert loading.status_code == 503 and loading.json()["error"] == "not_ready"
        gate.set()
        _wait_for(lambda: client.get("/ready").status_code == 200, "the models to load")
        assert client.post("/v1/predict", files=photo()).status_code == 200


def test_a_failed_load_is_reported_by_ready() -> None:
    def broken() -> FakePredictor:
        raise FileNotFoundError("No classifier checkpoint in /x")

    with TestClient(create_app(PredictionService(broken, ImageLimits()), api_key=None)) as client:
        _wait_for(lambda: "failed" in client.get("/ready").json()["detail"], "the load to fail")
        ready = client.get("/ready")
    assert ready.status_code == 503 and "No classifier checkpoint" in ready.json()["detail"]


def test_hard_case_uploads_are_kept_and_referenced(tmp_path) -> None:
    fake = FakePredictor(hard_case=["low_single_confidence"])
    with TestClient(make_app(fake, uploads_dir=tmp_path / "uploads")) as client:
        data = png_bytes(color=(1, 2, 3))
        assert client.post("/v1/predict", files=photo("pill.PNG", data), headers=KEY).status_code == 200
    [kept] = (tmp_path / "uploads").iterdir()  # named by the server (test_serve_hardcases.py)
    assert kept.suffix == ".png" and fake.seen[-1]["name"] == str(kept)  # the record points at the kept upload
    assert kept.read_bytes() == data


def test_a_hard_case_upload_that_cannot_be_kept_still_gets_its_answer(tmp_path, caplog) -> None:
    """A full disk or a read-only uploads folder made the whole prediction a 500."""
    fake = FakePredictor(hard_case=["low_single_confidence"])
    (tmp_path / "uploads").write_text("a file where the folder should be", encoding="utf-8")
    with TestClient(make_app(fake, uploads_dir=tmp_path / "uploads")) as client, caplog.at_level(logging.WARNING):
        for _ in range(3):
            answer = client.post("/v1/predict", files=photo("pill.png", png_bytes()), headers=KEY)
            assert answer.status_code == 200 and answer.json()["pills"][0]["mapping_code"] == "K-000001"
    warned = [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()]
    assert len(warned) == 1 and "pill.png" in warned[0]  # said once, not at every request


def test_a_run_of_failures_is_warned_at_the_1st_10th_100th_and_again_after_a_success(caplog) -> None:
    from pillsnap.utils.logs import FailureRun

    run = FailureRun(logging.getLogger("pillsnap.test"))
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            run.failed("disk full")
        run.passed()
        run.failed("disk full")
    assert [r.getMessage() for r in caplog.records] == [
        "disk full", "disk full (10 times in a row)", "disk full (100 times in a row)", "disk full"]


def test_combo_mode_on_a_model_without_a_detector_is_a_409(client, fake) -> None:
    fake.has_detector = False
    answer = client.post("/v1/predict", files=photo("pill.png", png_bytes()), data={"mode": "combo"}, headers=KEY)
    assert (answer.status_code, answer.json()["error"]) == (409, "no_detector") and not fake.seen
    batch = client.post("/v1/predict/batch", files=[("files", ("a.png", png_bytes(), "image/png"))],
                        data={"mode": "combo"}, headers=KEY).json()["results"]
    assert (batch[0]["status"], batch[0]["error"]) == (409, "no_detector")
    assert client.post("/v1/predict", files=photo("pill.png", png_bytes()), data={"mode": "auto"},
                       headers=KEY).status_code == 200


def test_docs_and_page_work_offline(client) -> None:
    docs, page = client.get("/docs"), client.get("/")
    for resp in (docs, page):
        assert resp.status_code == 200 and "default-src 'self'" in resp.headers["content-security-policy"]
        text = resp.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace name, never fetched
        assert "http://" not in text and "https://" not in text
        assert "<script src" not in resp.text and "<link rel=\"stylesheet\"" not in resp.text
    assert "/v1/predict/batch" in docs.text and "Prediction" in docs.text and "X-API-Key header" in docs.text
    assert 'data-auth="true"' in page.text and "/v1/predict" in page.text
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/predict", "/health", "/ready", "/version", "/metrics"} <= set(
        spec["paths"])
    assert spec["paths"]["/predict"]["post"]["deprecated"] is True


def test_serve_command_wires_the_key_and_warns_without_one(tmp_path, monkeypatch, caplog) -> None:
    import uvicorn
    from test_infer_pipeline import make_exp_dir

    from pillsnap.cli import build_parser
    from pillsnap.cli import main as cli_main

    config = Path(__file__).resolve().parents[1] / "config.yaml"
    exp_dir = make_exp_dir(tmp_path / "exp")
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    monkeypatch.delenv("PILLSNAP_API_KEY", raising=False)
    monkeypatch.delenv("PILLSNAP_SERVING_API_KEY", raising=False)
    served: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append((app, kwargs)))
    assert cli_main(["serve", "--exp", str(exp_dir), "--cfg", str(config), "--port", "8123"]) == 0
    assert "NO API KEY" in caplog.text and served[-1][1]["port"] == 8123
    monkeypatch.setenv("PILLSNAP_API_KEY", "987654")
    caplog.clear()
    assert cli_main(["serve", "--exp", str(exp_dir), "--cfg", str(config)]) == 0
    assert "NO API KEY" not in caplog.text
    with TestClient(served[-1][0]) as client:  # models load in the background meanwhile
        assert client.post("/v1/predict", files=photo()).status_code == 401
        assert client.post("/v1/predict", files=photo(), headers={"X-API-Key": "987654"}).status_code != 401
    serve = next(a for a in build_parser()._actions if a.dest == "command").choices["serve"]
    options = [o for action in serve._actions for o in action.option_strings]
    assert "--port" in options and not [o for o in options if "key" in o]  # no command-line option for the key
