"""HTTP API through TestClient with a stand-in predictor: auth, 413, bad images, modes."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pillsnap.serve.app import create_app


def fake_predict(image: Image.Image, mode: str) -> dict:
    used = "combo" if mode == "combo" else "single"
    return {"mode_used": used, "pills": [{"bbox": [0, 0, image.width, image.height], "topk": []}]}


def png_bytes(size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def client():
    return TestClient(create_app(fake_predict, api_key="k", max_upload_mb=0.05))


def test_health(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_predict_ok_passes_image_and_mode(client):
    resp = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}, data={"mode": "combo"},
                       headers={"X-API-Key": "k"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["mode_used"] == "combo" and body["filename"] == "a.png"
    assert body["pills"][0]["bbox"] == [0, 0, 32, 24]


def test_auth_required(client):
    resp = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    assert resp.status_code == 401
    resp = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}, headers={"X-API-Key": "x"})
    assert resp.status_code == 401


def test_no_auth_when_no_key():
    client = TestClient(create_app(fake_predict))
    assert client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}).status_code == 200


def test_oversized_upload_413(client):
    big = b"\x89PNG" + b"0" * 100_000
    resp = client.post("/predict", files={"file": ("big.png", big, "image/png")}, headers={"X-API-Key": "k"})
    assert resp.status_code == 413 and "MB" in resp.json()["detail"]


def test_corrupt_and_empty_image_400(client):
    import ultralytics  # noqa: F401  - it patches PIL.Image.open to pip-install pi-heif; decoding must not care
    resp = client.post("/predict", files={"file": ("x.png", b"not an image", "image/png")}, headers={"X-API-Key": "k"})
    assert resp.status_code == 400 and "not a readable image" in resp.json()["detail"]
    resp = client.post("/predict", files={"file": ("x.png", b"", "image/png")}, headers={"X-API-Key": "k"})
    assert resp.status_code == 400 and "Empty upload" in resp.json()["detail"]


def test_bad_mode_422(client):
    resp = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}, data={"mode": "magic"},
                       headers={"X-API-Key": "k"})
    assert resp.status_code == 422 and "mode must be one of" in resp.json()["detail"]
