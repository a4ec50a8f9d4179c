"""POST /v1/enrol, GET /v1/enrol and DELETE /v1/enrol/{code} on a real (tiny, calibrated) experiment: behind the API
key, 4xx JSON for bad input with nothing changed, and the served model answering the new drug at once."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_enrol import NEW_CODE, NEW_COLOUR, base_exp, exp_dir, photos, pill, store_state  # noqa: F401 - fixtures
from test_infer_pipeline import _cfg, features_of

from pillsnap.infer.pipeline import Predictor
from pillsnap.serve.app import create_app
from pillsnap.serve.service import PredictionService
from pillsnap.serve.settings import ServeSettings
from pillsnap.utils.images import ImageLimits

KEY = {"X-API-Key": "k"}


@pytest.fixture()
def client(exp_dir: Path):  # noqa: F811 - the fixture imported above
    def load() -> Predictor:
        return Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")

    service = PredictionService(load, ImageLimits(min_side=32))
    service.setup()
    with TestClient(create_app(service, ServeSettings(), api_key="k")) as test_client:
        yield test_client


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("photos", (p.name, p.read_bytes(), "image/png")) for p in paths]


def form(**extra: str) -> dict:
    return {"code": NEW_CODE, "name": "새약 10mg", "imprint_front": "NEW", "color": "yellow", **extra}


def test_every_enrol_endpoint_needs_the_key(client: TestClient, exp_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    new = photos(tmp_path / "new", NEW_COLOUR, range(5))
    for response in (client.post("/v1/enrol", files=upload(new), data=form()), client.get("/v1/enrol"),
                     client.delete(f"/v1/enrol/{NEW_CODE}"),
                     client.get("/v1/enrol", headers={"X-API-Key": "wrong"})):
        assert response.status_code == 401 and response.json()["error"]
    assert store_state(exp_dir) is None


def test_enrol_answer_list_remove(client: TestClient, tmp_path: Path) -> None:
    new = photos(tmp_path / "new", NEW_COLOUR, range(5))
    made = client.post("/v1/enrol", files=upload(new), data=form(), headers=KEY)
    assert made.status_code == 200, made.text
    body = made.json()
    assert (body["mapping_code"], body["n_photos"], body["replaced"]) == (NEW_CODE, 5, False)
    assert body["takes_known"]["measured"] is False and "the calibration has no probe" in body["takes_known"]["why"]
    assert [c["photo"] for c in body["crops"]] == [p.name for p in new]
    probe = pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle")
    answer = client.post("/v1/predict", files={"file": ("probe.png", probe.read_bytes(), "image/png")},
                         data={"mode": "single"}, headers=KEY).json()
    assert answer["pills"][0]["mapping_code"] == NEW_CODE and answer["pills"][0]["name"] == "새약 10mg"
    listed = client.get("/v1/enrol", headers=KEY).json()
    assert listed["stale"] is None and [d["mapping_code"] for d in listed["drugs"]] == [NEW_CODE]
    assert listed["drugs"][0]["colors"] == ["노랑"]
    assert client.delete(f"/v1/enrol/{NEW_CODE}", headers=KEY).json() == {"removed": NEW_CODE, "name": "새약 10mg"}
    again = client.post("/v1/predict", files={"file": ("probe.png", probe.read_bytes(), "image/png")},
                        data={"mode": "single"}, headers=KEY).json()
    assert again["pills"][0]["mapping_code"] != NEW_CODE
    gone = client.delete(f"/v1/enrol/{NEW_CODE}", headers=KEY)
    assert gone.status_code == 404 and gone.json()["error"] == "not_enrolled"


def test_bad_enrolments_are_4xx_json_and_change_nothing(client: TestClient, exp_dir: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    new = photos(tmp_path / "new", NEW_COLOUR, range(5))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a photo")
    buf = io.BytesIO()
    Image.new("RGB", (120, 160), (190, 190, 185)).save(buf, format="PNG")
    blank = tmp_path / "blank.png"
    blank.write_bytes(buf.getvalue())
    eleven = photos(tmp_path / "eleven", NEW_COLOUR, range(10))
    cases = [
        (upload(new[:2]), form(), 422, "photo_count"),
        (upload([*eleven, junk]), form(), 422, "photo_count"),  # counted before any photo is decoded
        (upload(new), form(code="K-000001"), 409, "trained_class"),
        (upload(new), form(code="nope"), 422, "bad_field"),
        (upload(new), form(shape="blob"), 422, "bad_field"),
        (upload([*new[:4], junk]), form(), 400, "image_unreadable"),
        (upload([*new[:4], blank]), form(), 422, "no_pill"),
    ]
    for files, data, status, error in cases:
        response = client.post("/v1/enrol", files=files, data=data, headers=KEY)
        assert (response.status_code, response.json()["error"]) == (status, error), response.text
        assert response.json()["detail"] and store_state(exp_dir) is None
    assert client.post("/v1/enrol", files=upload(new), data=form(), headers=KEY).status_code == 200
    before = store_state(exp_dir)
    for data, error in ((form(), "already_enrolled"), (form(code="K-900002"), "look_alike")):
        response = client.post("/v1/enrol", files=upload(new), data=data, headers=KEY)
        assert (response.status_code, response.json()["error"]) == (409, error)
        assert store_state(exp_dir) == before
    assert client.post("/v1/enrol", files=upload(new), data=form(replace="true"), headers=KEY).json()["replaced"]


def test_an_enrolment_taking_the_trained_drugs_answers_is_a_409_until_forced(exp_dir: Path,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    """The probe says the new drug's look takes the validation pills of a trained drug: 409 takes_known naming it,
    nothing stored; force=true enrols it and the answer says what it takes."""
    import numpy as np
    from test_enrol import _with_probe

    from pillsnap.infer.enrolment import Probe
    from pillsnap.infer.preprocess import crop_pill, locate_pill
    from pillsnap.metrics.novelty import ClassGaussians

    predictor = Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")
    crops = []
    for path in photos(tmp_path / "lookers", NEW_COLOUR, range(20, 30)):
        image = Image.open(path).convert("RGB")
        crops.append(crop_pill(image, locate_pill(image), predictor.crop_margin))
    whiten = ClassGaussians.load(features_of(exp_dir)).whiten
    _with_probe(exp_dir, Probe(predictor.forward(crops)[1].numpy() @ whiten, np.zeros(10, np.int64),
                               np.full(10, 0.6, np.float32), np.ones(10, bool)))

    def load() -> Predictor:
        return Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false"), device="cpu")

    service = PredictionService(load, ImageLimits(min_side=32))
    service.setup()
    new = photos(tmp_path / "new", NEW_COLOUR, range(5))
    with TestClient(create_app(service, ServeSettings(), api_key="k")) as client:
        refused = client.post("/v1/enrol", files=upload(new), data=form(), headers=KEY)
        assert (refused.status_code, refused.json()["error"]) == (409, "takes_known"), refused.text
        assert "K-000001" in refused.json()["detail"] and store_state(exp_dir) is None
        forced = client.post("/v1/enrol", files=upload(new), data=form(force="true"), headers=KEY)
        assert forced.status_code == 200 and forced.json()["takes_known"]["refused"] is True


def test_a_broken_enrolment_store_is_a_409_and_predictions_go_on(client: TestClient, exp_dir: Path,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    store = exp_dir / "checkpoints" / "enrolment.json"
    store.write_text('{"classifier_sha256": "x", "drugs": [', encoding="utf-8")
    listed = client.get("/v1/enrol", headers=KEY)
    assert (listed.status_code, listed.json()["error"]) == (409, "store_broken")
    probe = pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle")
    answer = client.post("/v1/predict", files={"file": ("probe.png", probe.read_bytes(), "image/png")},
                         data={"mode": "single"}, headers=KEY)
    assert answer.status_code == 200 and answer.json()["pills"]
    made = client.post("/v1/enrol", files=upload(photos(tmp_path / "new", NEW_COLOUR, range(5))), data=form(),
                       headers=KEY)
    assert (made.status_code, made.json()["error"]) == (409, "store_broken")
    assert store.read_text(encoding="utf-8") == '{"classifier_sha256": "x", "drugs": ['


def test_the_enrol_body_limit_holds_the_most_photos_an_enrolment_takes(caplog) -> None:
    from pillsnap.infer.enrol import MAX_PHOTOS
    from pillsnap.serve.settings import MULTIPART_SLACK

    settings = ServeSettings(max_upload_mb=1, max_batch_files=2)
    assert settings.body_limit("/v1/enrol") == MAX_PHOTOS * 2**20 + MULTIPART_SLACK
    # a budget that holds a batch but not ten photos still starts: an enrolment gets what the budget holds
    tight = ServeSettings(max_upload_mb=10, max_batch_files=8, max_inflight_upload_mb=90)
    tight.check()
    assert tight.body_limit("/v1/enrol") == 90 * 2**20
    with caplog.at_level(logging.WARNING):
        ServeSettings(max_upload_mb=10, max_batch_files=1, max_inflight_upload_mb=20).check()
    assert "fewer than the 3 photos" in caplog.text
