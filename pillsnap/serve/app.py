"""HTTP prediction API (FastAPI), split LitServe-style: decode request -> predict -> encode response.

The app knows nothing of models: it is given a `predict(image, mode) -> dict` callable. `pillsnap serve`
builds that callable from an experiment directory (pillsnap.infer.Predictor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from pillsnap.infer.gating import INFERENCE_MODES  # pure Python: no model code is imported
from pillsnap.utils.images import decode_image

LOGGER = logging.getLogger(__name__)
PredictFn = Callable[[Image.Image, str], dict]


def decode_upload(data: bytes, filename: str | None) -> Image.Image:
    """Upload bytes -> RGB PIL image; a clear 400 for anything that is not a decodable image."""
    if not data:
        raise HTTPException(status_code=400, detail="Empty upload: send an image file in the 'file' field.")
    try:
        return decode_image(data, filename or "upload")
    except OSError as err:
        raise HTTPException(status_code=400, detail=f"Uploaded file is not a readable image: {err}") from err


def api_key_dependency(expected: str | None) -> Callable:
    """FastAPI dependency that checks X-API-Key when a key is configured."""

    def check(x_api_key: str | None = Header(default=None)) -> None:
        if expected and x_api_key != expected:
            raise HTTPException(status_code=401, detail="Missing or wrong X-API-Key header.")

    return check


def create_app(predict: PredictFn, api_key: str | None = None, max_upload_mb: float = 10) -> FastAPI:
    """Build the API: GET /health, POST /predict (multipart 'file', optional form 'mode')."""
    app = FastAPI(title="PillSnap", description="Which drugs are in this photo?")
    limit = int(max_upload_mb * 2**20)

    @app.middleware("http")
    async def reject_oversized(request: Request, call_next):
        # Refuse on the declared size before reading the body; the handler re-checks the bytes it got.
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
            return JSONResponse(status_code=413, content={"detail": f"Upload larger than {max_upload_mb} MB."})
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict", dependencies=[Depends(api_key_dependency(api_key))])
    async def predict_endpoint(file: UploadFile = File(...), mode: str = Form("auto")) -> dict:
        if mode not in INFERENCE_MODES:
            raise HTTPException(status_code=422, detail=f"mode must be one of {INFERENCE_MODES}, got {mode!r}")
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise HTTPException(status_code=413, detail=f"Upload larger than {max_upload_mb} MB.")
        image = decode_upload(data, file.filename)
        result = predict(image, mode)
        LOGGER.info("predict %s mode=%s -> %s, %d pill(s)", file.filename, mode, result.get("mode_used"),
                    len(result.get("pills", [])))
        return {"filename": file.filename, **result}

    return app
