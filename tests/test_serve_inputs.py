"""Hostile and odd photos through the API and through `pillsnap predict`, which share one decoder: a decompression
bomb, a tiny image, an EXIF-rotated phone photo, 16-bit grey, junk. The API answers each with a clear 4xx (or a
correct prediction); `predict` reports a bad file in its own result and still answers the others."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, features
from test_infer_pipeline import make_exp_dir, pill_photo
from test_serve_api import KEY, FakePredictor, make_app
from test_utils_images import corrupt_avif, png_bomb

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


@pytest.fixture
def broken_photo(monkeypatch) -> bytes:
    """Bytes PIL identifies but its plugin fails to decode with RuntimeError("Failed to decode frame 0"): a real
    corrupt AVIF where this Pillow reads AVIF, else any photo whose decoding is made to fail that way."""
    if features.check("avif"):
        return corrupt_avif()
    from pillsnap.utils import images

    marker, original = b"\x00\x00\x00 ftypavif broken", images._pil_open

    def pil_open(fp: io.BytesIO) -> Image.Image:
        if fp.getvalue().startswith(marker):
            raise RuntimeError("Failed to decode frame 0")
        return original(fp)

    monkeypatch.setattr(images, "_pil_open", pil_open)
    return marker


def test_a_corrupt_avif_gets_400_naming_the_file(api, broken_photo: bytes) -> None:
    client, fake = api
    resp = post(client, "broken.avif", broken_photo)
    assert resp.status_code == 400 and resp.json()["error"] == "image_unreadable" and fake.seen == []
    assert "broken.avif" in resp.json()["detail"] and "Traceback" not in resp.text


def test_a_corrupt_avif_in_a_batch_gets_its_own_entry(api, broken_photo: bytes) -> None:
    client, _ = api
    files = [("files", ("good.png", encoded(Image.new("RGB", (64, 64))), "image/png")),
             ("files", ("broken.avif", broken_photo, "image/avif"))]
    resp = client.post("/v1/predict/batch", files=files, headers=KEY)
    assert resp.status_code == 200
    good, broken = resp.json()["results"]
    assert good["filename"] == "good.png" and len(good["pills"]) == 1
    assert (broken["filename"], broken["status"], broken["error"]) == ("broken.avif", 400, "image_unreadable")
    assert "broken.avif" in broken["detail"]


@pytest.mark.parametrize(("field", "value", "named"), [
    ("imprint", "A" * 1_000_000, "imprint hint is 1000000 characters long; at most 32"),
    ("imprint", "AB\x00<script>", "imprint hint has characters no imprint has"),
    ("color", "white," * 100, "color hint is 600 characters long; at most 64"),
    ("shape", "round " * 20, "shape hint is 120 characters long; at most 64"),
])
def test_oversized_or_odd_hints_are_refused_before_any_work(api, field: str, value: str, named: str) -> None:
    client, fake = api
    start = time.perf_counter()
    resp = client.post("/v1/predict", files={"file": ("a.png", encoded(Image.new("RGB", (64, 64))), "image/png")},
                       data={field: value}, headers=KEY)
    batch = client.post("/v1/predict/batch", files=[("files", ("a.png", encoded(Image.new("RGB", (64, 64)))))],
                        data={field: value}, headers=KEY)
    assert time.perf_counter() - start < 5  # the old server spent 68 s matching a 1,000,000-character imprint
    for answer in (resp, batch):
        assert answer.status_code == 422 and answer.json()["error"] == "bad_hint"
        assert named in answer.json()["detail"] and len(answer.content) < 1000  # the hint is not echoed back
    assert fake.seen == []


def test_real_imprints_and_vocabulary_words_pass(api) -> None:
    client, fake = api
    resp = client.post("/v1/predict", files={"file": ("a.png", encoded(Image.new("RGB", (64, 64))), "image/png")},
                       data={"imprint": "마크 A1-2.5", "color": "light green, 하양", "shape": "타원형"}, headers=KEY)
    assert resp.status_code == 200 and fake.seen[-1]["hints"].imprint == "마크 A1-2.5"


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


def test_predict_cli_answers_the_good_file_next_to_a_corrupt_avif(exp_dir: Path, tmp_path: Path, capsys,
                                                                  broken_photo: bytes) -> None:
    good = pill_photo(tmp_path / "good.png", [(45, 60, 30, 24)])
    broken = tmp_path / "broken.avif"
    broken.write_bytes(broken_photo)
    code = cli_main(["predict", str(good), str(broken), "--exp", str(exp_dir), "--mode", "single"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0].startswith(f"{good}: mode_used=single pills=1") and lines[1].strip().startswith("#1 K-")
    assert lines[-1].startswith(f"{broken}: ERROR Cannot read image {broken}")


def test_predict_cli_refuses_an_oversized_imprint_in_one_line(exp_dir: Path, tmp_path: Path, caplog) -> None:
    photo = pill_photo(tmp_path / "p.png", [(45, 60, 30, 24)])
    assert cli_main(["predict", str(photo), "--exp", str(exp_dir), "--imprint", "A" * 100_000]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "predict: imprint hint is 100000 characters long; at most 32 are accepted"]


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
    assert Path(record["image"]).parent == run_dir / "hard_cases" / "uploads" and record["image"].endswith(".png")
    assert record["request_id"] == resp.json()["request_id"]
    assert Path(record["image"]).read_bytes() == data


def test_a_heic_phone_photo_is_answered_upright_and_previewed_as_jpeg(api) -> None:
    """iPhones save HEIC: the API answers it like a JPEG, and /v1/preview gives the page a JPEG it can show (no
    browser but Safari shows HEIC), upright and at most 1600 px."""
    from test_utils_images import heic

    stored = Image.new("RGB", (2400, 1200), (0, 0, 230))
    stored.paste((230, 0, 0), (0, 0, 1200, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = heic(stored, exif=exif.tobytes())
    client, fake = api
    resp = post(client, "IMG_0001.HEIC", photo)
    assert resp.status_code == 200 and resp.json()["image_size"] == [1200, 2400]
    assert fake.seen[-1]["pixels"][100, 600, 0] > 180  # red on top: the frame people see
    seen = len(fake.seen)
    shown = client.post("/v1/preview", files={"file": ("IMG_0001.HEIC", photo, "image/heic")}, headers=KEY)
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/jpeg"
    preview = Image.open(io.BytesIO(shown.content))
    assert (preview.format, preview.size) == ("JPEG", (800, 1600))
    assert preview.getpixel((400, 200))[0] > 180 and preview.getpixel((400, 1400))[2] > 180
    assert len(fake.seen) == seen  # a preview runs no model
    broken = client.post("/v1/preview", files={"file": ("cut.heic", photo[:300], "image/heic")}, headers=KEY)
    assert broken.status_code == 400 and broken.json()["error"] == "image_unreadable"
    assert "cut.heic" in broken.json()["detail"] and "damaged HEIC" in broken.json()["detail"]
    assert client.post("/v1/preview", files={"file": ("IMG_0001.HEIC", photo, "image/heic")}).status_code == 401
    empty = client.post("/v1/preview", files={"file": ("e.heic", b"", "image/heic")}, headers=KEY)
    assert empty.status_code == 400 and empty.json()["error"] == "empty_upload"


def test_predict_cli_reads_heic_photos_in_a_folder(exp_dir: Path, tmp_path: Path, capsys) -> None:
    from test_utils_images import heic

    folder = tmp_path / "camera"
    folder.mkdir()
    png = pill_photo(folder / "a.png", [(45, 60, 30, 24)])
    (folder / "b.HEIC").write_bytes(heic(Image.open(png)))
    assert cli_main(["predict", str(folder), "--exp", str(exp_dir), "--mode", "single", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in results] == ["a.png", "b.HEIC"]
    assert [len(r["pills"]) for r in results] == [1, 1] and results[1]["image_size"] == results[0]["image_size"]


def test_serve_on_a_taken_port_is_one_line_before_the_models_load(exp_dir: Path, caplog) -> None:
    """It announced 'PillSnap on http://...' and loaded the models before uvicorn failed to listen (exit 3)."""
    import socket

    from pillsnap.cli import main
    from pillsnap.serve.cli import port_in_use

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port) is not None
        with caplog.at_level(logging.INFO):
            assert main(["serve", "--exp", str(exp_dir), "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert f"serve: cannot listen on 127.0.0.1:{port}" in caplog.text and "PillSnap on" not in caplog.text
    assert "NO API KEY" not in caplog.text  # stopped before anything else was said or set up
    assert port_in_use("127.0.0.1", port) is None  # free again
