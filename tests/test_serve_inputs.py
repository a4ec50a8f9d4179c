"""Hostile and odd photos through the API and through `pillsnap predict`, which share one decoder: a decompression
bomb, a tiny image, an EXIF-rotated phone photo, 16-bit grey, junk. The API answers each with a clear 4xx (or a
correct prediction); `predict` reports a bad file in its own result and still answers the others."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_infer_pipeline import make_exp_dir, pill_photo
from test_serve_api import KEY, FakePredictor, make_app
from test_utils_images import png_bomb

from pillsnap.cli import main as cli_main


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def rotated_phone_photo() -> bytes:
    """Stored landscape 80x40 with the left half red and EXIF 'rotate 90 clockwise': upright it is 40x80."""
    stored = Image.new("RGB", (80, 40), (0, 0, 230))
    stored.paste((230, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(stored, "JPEG", exif=exif, quality=95)


@pytest.fixture
def api():
    fake = FakePredictor()
    with TestClient(make_app(fake)) as client:
        yield client, fake


def post(client: TestClient, name: str, data: bytes):
    return client.post("/v1/predict", files={"file": (name, data, "application/octet-stream")}, headers=KEY)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_gets_413_and_never_reaches_the_model(api) -> None:
    client, fake = api
    resp = post(client, "bomb.png", png_bomb(13000))
    assert resp.status_code == 413 and resp.json()["error"] == "image_too_large"
    assert "13000x13000" in resp.json()["detail"] and fake.seen == []


def test_tiny_image_gets_422(api) -> None:
    client, fake = api
    resp = post(client, "dot.png", encoded(Image.new("RGB", (1, 1))))
    assert resp.status_code == 422 and resp.json()["error"] == "image_too_small" and fake.seen == []
    assert "too small to hold a pill" in resp.json()["detail"]


def test_exif_rotated_photo_reaches_the_model_upright(api) -> None:
    client, fake = api
    resp = post(client, "phone.jpg", rotated_phone_photo())
    assert resp.status_code == 200 and resp.json()["image_size"] == [40, 80]
    pixels = fake.seen[-1]["pixels"]
    assert pixels[10, 20, 0] > 180 and pixels[70, 20, 2] > 180  # red on top, blue below: the frame people see


def test_16_bit_grey_reaches_the_model_as_grey_not_white(api) -> None:
    client, fake = api
    resp = post(client, "scan.png", encoded(Image.fromarray(np.full((64, 64), 100 * 257, dtype=np.uint16))))
    assert resp.status_code == 200
    assert np.all(fake.seen[-1]["pixels"] == 100)


def test_junk_gets_400_without_internals(api) -> None:
    client, _ = api
    resp = post(client, "x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert resp.status_code == 400 and resp.json()["error"] == "image_unreadable"
    assert "0x" not in resp.text and "Traceback" not in resp.text


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory) -> Path:
    return make_exp_dir(tmp_path_factory.mktemp("exp"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_predict_cli_reports_bad_files_and_answers_the_rest(exp_dir: Path, tmp_path: Path, capsys) -> None:
    good = pill_photo(tmp_path / "good.png", [(45, 60, 30, 24)])
    bomb, dot, junk = tmp_path / "bomb.png", tmp_path / "dot.png", tmp_path / "junk.jpg"
    bomb.write_bytes(png_bomb(13000))
    dot.write_bytes(encoded(Image.new("RGB", (1, 1))))
    junk.write_bytes(b"not a photo")
    phone = tmp_path / "phone.jpg"
    phone.write_bytes(rotated_phone_photo())
    paths = [good, bomb, dot, junk, tmp_path / "missing.png", phone]
    code = cli_main(["predict", *map(str, paths), "--exp", str(exp_dir), "--mode", "single", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert code == 1 and [r["image"] for r in results] == [str(p) for p in paths]
    assert [r.get("error_type") for r in results] == [None, "ImageTooLarge", "ImageTooSmall", "ImageError",
                                                     "FileNotFoundError", None]
    assert results[0]["mode_used"] == "single" and len(results[0]["pills"]) == 1
    assert results[-1]["image_size"] == [40, 80]  # EXIF applied in predict too
    assert all(r["pills"] == [] and r["mode_used"] is None for r in results[1:5])


def test_hard_case_record_points_at_the_kept_upload(exp_dir: Path, tmp_path: Path) -> None:
    """Real models: every single-pill answer is a hard case here, so its record must name a file holding the
    exact bytes the client sent."""
    from pillsnap.config import load_config
    from pillsnap.serve.app import create_app
    from pillsnap.serve.cli import build_service

    run_dir = tmp_path / "exp"
    shutil.copytree(exp_dir, run_dir)
    cfg = load_config("config.yaml", [f"paths.exp_dir={run_dir}", "inference.hard_cases.single_confidence_below=1.01"],
                      dotenv_path=None)
    service = build_service(run_dir, cfg, "cpu")
    service.setup()
    data = pill_photo(tmp_path / "one.png", [(45, 60, 30, 24)]).read_bytes()
    with TestClient(create_app(service)) as client:
        resp = client.post("/v1/predict", files={"file": ("one.png", data, "image/png")}, data={"mode": "single"})
    assert resp.status_code == 200 and "low_single_confidence" in resp.json()["hard_case"]
    log = next((run_dir / "hard_cases").glob("*.jsonl"))
    record = json.loads(log.read_text(encoding="utf-8").splitlines()[-1])
    assert record["image"] == str(run_dir / "hard_cases" / "uploads" / f"{resp.json()['request_id']}.png")
    assert Path(record["image"]).read_bytes() == data
