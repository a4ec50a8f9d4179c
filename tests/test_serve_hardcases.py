"""What the server writes from what a client sent: access-log lines that cannot be forged, request ids that name
nothing on disk, and hard-case uploads kept under a cap of files, bytes and age."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from omegaconf import OmegaConf
from PIL import Image
from test_serve_api import KEY, FakePredictor, make_app, photo, png_bytes

from pillsnap.config import ConfigError, load_config
from pillsnap.infer.hard_cases import HardCaseLog, KeepLimits, KeptFiles, files_to_prune, for_request, upload_store
from pillsnap.serve.guards import log_safe
from pillsnap.serve.service import safe_filename

FORGED = "/health%0A2026-12-04 INFO FORGED LINE admin login ok"


class LoggingPredictor(FakePredictor):
    """A stand-in that writes its hard cases to a real HardCaseLog, as pillsnap.infer.Predictor does."""

    def __init__(self, exp_dir: Path) -> None:
        super().__init__(hard_case=["low_single_confidence"])
        self.log = HardCaseLog(exp_dir)

    def predict(self, image: Image.Image, mode=None, conf_threshold=None, name=None, hints=None) -> dict:
        result = super().predict(image, mode, conf_threshold, name, hints)
        self.log.write(result, result["hard_case"])
        return result


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    text = "\n".join(formatter.format(r) for r in caplog.records if r.name == "pillsnap.serve.access")
    return text.splitlines()


def test_a_forged_path_makes_exactly_one_escaped_log_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pillsnap.serve.access"), TestClient(make_app()) as client:
        assert client.get(FORGED.replace(" ", "%20")).status_code == 401  # no key needed to reach the log
    [line] = _access_lines(caplog)  # before: two lines, the second a convincing "INFO FORGED LINE"
    assert "GET /health\\n2026-12-04 INFO FORGED LINE admin login ok 401" in line


def test_terminal_escapes_and_other_controls_are_escaped(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pillsnap.serve.access"), TestClient(make_app()) as client:
        client.get("/x%1B%5B2J%0D%C2%85%E2%80%A8%E2%80%AEend%5Cn")  # ESC [2J, CR, NEL, line sep., bidi override
    [line] = _access_lines(caplog)
    assert "/x\\x1b[2J\\r\\x85\\u2028\\u202eend\\\\n" in line and "\x1b" not in line
    assert log_safe("/v1/predict") == "/v1/predict" and log_safe("/약품 사진.png") == "/약품 사진.png"


def test_an_invented_method_adds_no_metric_series() -> None:
    with TestClient(make_app()) as client:
        for method in ("BREW", "XYZZY"):
            client.request(method, "/health")
        metrics = client.get("/metrics").text
    assert "BREW" not in metrics and "XYZZY" not in metrics and 'method="other"' in metrics


def test_a_file_name_loses_every_non_printable_character() -> None:
    """The name is echoed and logged (a batch photo that breaks the model is logged by name)."""
    assert safe_filename("C:\\x\\a\x1b[2J\x85b\u2028c\u202e\r\nd.png") == "a[2Jbcd.png"
    assert safe_filename("약 사진 1.jpg") == "약 사진 1.jpg" and safe_filename("\x85") == "upload"


@pytest.mark.parametrize("sent", [b"caf\xe9", b"\xb5s", b"a" * 65, b"a/b", b"a b", b"", b"../../etc/passwd"])
def test_a_request_id_outside_the_plain_alphabet_is_replaced(sent: bytes) -> None:
    with TestClient(make_app()) as client:
        resp = client.post("/v1/predict", files=photo(), headers={**KEY, "X-Request-ID": sent})
    rid = resp.json()["request_id"]
    assert resp.headers["x-request-id"] == rid and len(rid) == 32 and rid.isalnum() and rid.encode() != sent


def test_a_plain_request_id_is_echoed() -> None:
    with TestClient(make_app()) as client:
        resp = client.post("/v1/predict", files=photo(), headers={**KEY, "X-Request-ID": "job-7.retry_2"})
    assert resp.headers["x-request-id"] == resp.json()["request_id"] == "job-7.retry_2"


def test_a_reused_request_id_does_not_overwrite_the_first_photo(tmp_path: Path) -> None:
    predictor, first, second = LoggingPredictor(tmp_path), png_bytes(color=(1, 2, 3)), png_bytes(color=(9, 8, 7))
    with TestClient(make_app(predictor, uploads_dir=tmp_path / "hard_cases" / "uploads")) as client:
        for data in (first, second):
            resp = client.post("/v1/predict", files=photo("p.png", data), headers={**KEY, "X-Request-ID": "same"})
            assert resp.status_code == 200 and resp.headers["x-request-id"] == "same"
    records = [json.loads(line) for line in predictor.log.path_for_today().read_text(encoding="utf-8").splitlines()]
    assert [r["request_id"] for r in records] == ["same", "same"]  # the client's id is a field, not a file name
    assert records[0]["image"] != records[1]["image"]
    assert Path(records[0]["image"]).read_bytes() == first and Path(records[1]["image"]).read_bytes() == second
    assert all(len(Path(r["image"]).stem) == 32 for r in records)  # uuid4 hex


def test_records_outside_the_api_have_no_request_id(tmp_path: Path) -> None:
    log = HardCaseLog(tmp_path)
    log.write({"image": "a.png", "pills": []}, ["no_pill_detected"])
    with for_request("abc"):
        log.write({"image": "b.png", "pills": []}, ["no_pill_detected"])
    records = [json.loads(line) for line in log.path_for_today().read_text(encoding="utf-8").splitlines()]
    assert [r["request_id"] for r in records] == [None, "abc"]


def test_files_to_prune_takes_expired_then_oldest() -> None:
    day, now = 86400.0, 100 * 86400.0
    files = [("old", now - 40 * day, 10), ("a", now - 3, 10), ("b", now - 2, 10), ("c", now - 1, 10)]
    limits = KeepLimits(max_files=10, max_bytes=1000, retention_days=30)
    assert files_to_prune(files, limits, now) == ["old"]
    assert files_to_prune(files, KeepLimits(2, 1000, 30), now) == ["old", "a"]
    assert files_to_prune(files, KeepLimits(10, 15, 30), now) == ["old", "a", "b"]
    assert files_to_prune(files[1:], limits, now) == []


def test_kept_files_stay_under_the_count_and_byte_caps(tmp_path: Path) -> None:
    store = KeptFiles(tmp_path / "uploads", KeepLimits(max_files=3, max_bytes=250, retention_days=30))
    paths = []
    for i in range(5):
        paths.append(store.new_path(".png"))
        assert store.keep(paths[-1], bytes([i]) * 100)
        os.utime(paths[-1], (time.time() - 10 + i,) * 2)  # distinct ages whatever the file system's clock step
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == sorted(p.name for p in paths[3:])
    assert not store.keep(store.new_path(".png"), b"x" * 251)  # alone over the byte cap: not kept
    with pytest.raises(ValueError, match="new_path"):
        store.keep(tmp_path / "elsewhere.png", b"x")


def test_expired_files_go_when_the_next_one_is_kept(tmp_path: Path) -> None:
    store = KeptFiles(tmp_path, KeepLimits(max_files=10, max_bytes=10**6, retention_days=1))
    old = store.new_path(".jpg")
    store.keep(old, b"old")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    store.keep(store.new_path(".jpg"), b"new")
    assert not old.exists() and len(list(tmp_path.iterdir())) == 1


def test_thumbnails_are_capped_too(tmp_path: Path) -> None:
    log = HardCaseLog(tmp_path, thumbnails=True, limits=KeepLimits(max_files=2, max_bytes=10**6, retention_days=1))
    for _ in range(4):
        log.write({"image": None, "pills": []}, ["no_pill_detected"], Image.new("RGB", (300, 200)))
    assert len(list((tmp_path / "hard_cases" / "thumbnails").iterdir())) == 2


def test_limits_come_from_config_and_bad_ones_are_named(tmp_path: Path) -> None:
    cfg = load_config("config.yaml", ["inference.hard_cases.max_files=7", "inference.hard_cases.max_mb=1.5"],
                      dotenv_path=None)
    stale = tmp_path / "hard_cases" / "uploads" / "0123.png"  # kept by an earlier run, now past the retention
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 31 * 86400,) * 2)
    store = upload_store(tmp_path, cfg.inference.hard_cases)
    assert store is not None and store.root == stale.parent and not stale.exists()  # pruned on start
    assert (store.limits.max_files, store.limits.max_bytes, store.limits.retention_days) == (7, 1.5 * 2**20, 30)
    off = OmegaConf.merge(cfg.inference.hard_cases, {"enabled": False})
    assert upload_store(tmp_path, off) is None
    with pytest.raises(ConfigError, match="max_files, max_mb and retention_days must be positive"):
        KeepLimits.from_config(OmegaConf.merge(cfg.inference.hard_cases, {"retention_days": 0.0}))


def test_a_kept_upload_is_written_whole(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 6, 7)).save(buffer, format="PNG")
    predictor = FakePredictor(hard_case=["unknown_pill"])
    with TestClient(make_app(predictor, uploads_dir=tmp_path)) as client:
        client.post("/v1/predict", files=photo("x.png", buffer.getvalue()), headers=KEY)
    [kept] = [p for p in tmp_path.iterdir()]
    assert kept.read_bytes() == buffer.getvalue() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
