"""The enrolment endpoints: POST /v1/enrol (a new drug from 3 to 10 photos), GET /v1/enrol (the list) and
DELETE /v1/enrol/{code}, all behind the API key. The work is pillsnap.infer.enrol's, run on a worker thread; every
refusal is a 4xx JSON error naming the problem, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile

from pillsnap.serve.errors import RequestRejected, image_error_status
from pillsnap.serve.schemas import ERROR_RESPONSES, EnrolList, Enrolment, EnrolRemoved
from pillsnap.serve.service import NotReady
from pillsnap.utils.images import ImageError, decode_image

# The status of each kind of refusal (pillsnap.infer.enrolment.EnrolmentError.kind); others are 422.
STATUS = {"trained_class": 409, "already_enrolled": 409, "look_alike": 409, "takes_known": 409, "stale": 409,
          "not_calibrated": 409, "no_features": 409, "store_broken": 409, "not_enrolled": 404}


def _rejected(err: Exception) -> RequestRejected:
    kind = getattr(err, "kind", "bad_field")
    return RequestRejected(STATUS.get(kind, 422), str(err), kind)


def _predictor(state: Any) -> Any:
    if state.service.predictor is None:
        raise NotReady()
    return state.service.predictor


def _enrol_job(state: Any, uploads: list, fields: dict) -> dict:
    """Decode the photos with the server's limits, then enrol (on a worker thread)."""
    from pillsnap.infer.enrol import DrugInfo, Photo, check_photo_count, enrol
    from pillsnap.infer.enrolment import EnrolmentError

    predictor = _predictor(state)
    try:
        info = DrugInfo.parse(fields["code"], fields["name"], fields["imprint_front"], fields["imprint_back"],
                              fields["color"], fields["shape"])
        check_photo_count(len(uploads))  # before decoding any
        photos = []
        for upload in uploads:
            if not upload.data:
                raise RequestRejected(400, f"Empty upload {upload.filename!r}: send the photo's bytes", "empty_upload")
            photos.append(Photo(decode_image(upload.data, repr(upload.filename), state.service.limits),
                                upload.filename))
        return enrol(predictor, info, photos, replace=fields["replace"], force=fields["force"])
    except ImageError as err:
        status, code = image_error_status(err)
        raise RequestRejected(status, f"photo {err}", code) from err
    except EnrolmentError as err:
        raise _rejected(err) from err


def _remove_job(state: Any, code: str) -> dict:
    from pillsnap.infer.enrol import remove
    from pillsnap.infer.enrolment import EnrolmentError

    predictor = _predictor(state)
    try:
        result = remove(predictor.exp_dir, code, predictor.classifier_path, predictor.classifier_sha256)
    except EnrolmentError as err:
        raise _rejected(err) from err
    predictor.refresh_enrolment()
    return result


def _list_job(state: Any) -> dict:
    from pillsnap.infer.enrol import listing
    from pillsnap.infer.enrolment import EnrolmentError

    predictor = _predictor(state)
    try:
        return listing(predictor.exp_dir, predictor.classifier_path, predictor.classifier_sha256)
    except EnrolmentError as err:  # a broken store
        raise _rejected(err) from err


def add_enrol_routes(app: FastAPI, state: Any, read_upload: Callable[..., Any]) -> None:
    """The three endpoints, on `state` (serve.app.AppState); `read_upload` is the app's size-checked reader. The
    photo count is checked by the enrolment itself (422 photo_count); the body limit bounds what is read."""
    @app.post("/v1/enrol", response_model=Enrolment, responses=ERROR_RESPONSES,
              summary="Enrol a new drug from 3 to 10 photos, without retraining")
    async def enrol_v1(request: Request,
                       photos: list[UploadFile] = File(..., description="3 to 10 photos of the drug"),
                       code: str = Form(..., description="the drug's code, K- and 6 digits"),
                       name: str = Form(..., description="the drug's name as answers show it"),
                       imprint_front: str | None = Form(None, description="imprint on the front"),
                       imprint_back: str | None = Form(None, description="imprint on the back"),
                       color: str | None = Form(None, description="colour(s), e.g. white, 하양"),
                       shape: str | None = Form(None, description="shape, e.g. round, 원형"),
                       replace: bool = Form(False, description="enrol again a drug already enrolled"),
                       force: bool = Form(False, description="enrol although the photos look like an existing "
                                                             "drug, or it would take the trained drugs' answers"),
                       ) -> dict:
        uploads = [await read_upload(file, request, state.settings) for file in photos]
        fields = {"code": code, "name": name, "imprint_front": imprint_front, "imprint_back": imprint_back,
                  "color": color, "shape": shape, "replace": replace, "force": force}
        return await state.run_job("enrol", request, _enrol_job, state, uploads, fields)

    @app.get("/v1/enrol", response_model=EnrolList, responses=ERROR_RESPONSES, summary="The enrolled drugs")
    async def enrol_list(request: Request) -> dict:
        return await state.run_job("enrol_list", request, _list_job, state)

    @app.delete("/v1/enrol/{code}", response_model=EnrolRemoved, responses=ERROR_RESPONSES,
                summary="Remove an enrolled drug")
    async def enrol_remove(request: Request, code: str) -> dict:
        return await state.run_job("enrol_remove", request, _remove_job, state, code)
