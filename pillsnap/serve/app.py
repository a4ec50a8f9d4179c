"""HTTP prediction API (FastAPI). The app knows nothing of models: it is given a PredictionService (the model side)
and wires HTTP around it: guards, endpoints, errors, metrics, the web page and the offline docs.

GET /, /docs, /openapi.json, /health, /ready, /version, /metrics; POST /v1/predict, /v1/predict/batch and the
older /predict; POST, GET /v1/enrol and DELETE /v1/enrol/{code} (serve/enrol.py).
`pillsnap serve` builds the service from an experiment directory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pillsnap.infer.gating import INFERENCE_MODES  # pure Python: no model code is imported
from pillsnap.infer.matching import Hints  # pure Python too
from pillsnap.serve.auth import KeyChecker
from pillsnap.serve.docs import render_docs
from pillsnap.serve.enrol import add_enrol_routes
from pillsnap.serve.errors import RequestRejected, install_error_handlers, request_id_of
from pillsnap.serve.guards import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from pillsnap.serve.limits import UploadBudget, UploadBudgetMiddleware
from pillsnap.serve.metrics import ServeMetrics
from pillsnap.serve.runner import ClientGone, InferenceRunner
from pillsnap.serve.schemas import ERROR_RESPONSES, BatchPrediction, Health, Prediction, Ready, Version
from pillsnap.serve.service import PredictionService, Upload, build_info, safe_filename
from pillsnap.serve.settings import ServeSettings

LOGGER = logging.getLogger(__name__)
PAGE_FILE = Path(__file__).with_name("page.html")
PUBLIC_PATHS = frozenset({"/", "/docs", "/openapi.json", "/health", "/ready", "/version", "/metrics"})
# The page and the docs load nothing from elsewhere; the policy makes a browser enforce it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'",
                "X-Content-Type-Options": "nosniff"}
Mode = Enum("Mode", {m: m for m in INFERENCE_MODES}, type=str)  # the one list of modes, as an OpenAPI enum
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request"; only the metrics and the log see it


class AppState:
    """What the endpoints share: the model side, the worker pool, the upload byte budget, metrics, limits."""

    def __init__(self, service: PredictionService, settings: ServeSettings, metrics: ServeMetrics) -> None:
        self.service, self.settings, self.metrics = service, settings, metrics
        self.runner = InferenceRunner(settings.workers, settings.max_queue, metrics)
        self.budget = UploadBudget(settings.max_inflight_upload_bytes, metrics)
        self.setup_error: str | None = None

    async def setup(self) -> None:
        """Load the models on a worker thread: the server answers /health meanwhile and /ready says when."""
        if self.service.ready:
            self.metrics.ready.set(1)
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.service.setup)
        except Exception as err:  # a process boundary: whatever broke, /ready must say so instead of hanging
            self.setup_error = f"{type(err).__name__}: {err}"
            LOGGER.error("loading the models failed: %s", self.setup_error, exc_info=err)
            return
        self.metrics.ready.set(1)

    async def run_job(self, endpoint: str, request: Request, fn: Callable[..., Any], *args: Any,
                      admitted: bool = False) -> Any:
        """fn(*args) on a worker, timed; dropped (ClientGone, counted) when the client has left by then."""
        def timed() -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.metrics.inference.labels(endpoint).observe(time.perf_counter() - start)

        try:
            return await self.runner.run(timed, gone=request.is_disconnected, admitted=admitted)
        except ClientGone:
            self.metrics.cancelled.labels(endpoint).inc()
            raise


def create_app(service: PredictionService, settings: ServeSettings | None = None, api_key: str | None = None,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The API over `service`; `api_key` None = no auth. Models load in the background at start-up."""
    state = AppState(service, settings or ServeSettings(), metrics or ServeMetrics())
    background: set[asyncio.Task] = set()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(state.setup())
        background.add(task)
        task.add_done_callback(background.discard)
        yield
        state.runner.shutdown()

    app = FastAPI(title="PillSnap", version=build_info()["version"], lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Which drugs are in this photo? Send a photo, get each pill's box, "
                  "its drug code and name, and the top candidates. When the server has an API key, the POST "
                  "endpoints need it in the X-API-Key header (or Authorization: Bearer); errors are JSON with "
                  "detail, error and request_id.")
    app.state.pillsnap = state
    install_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the access log and metrics do

    _add_pages(app, api_key is not None, state.settings)
    _add_status_routes(app, state)
    _add_predict_routes(app, state)
    add_enrol_routes(app, state, _read_upload)
    route_paths = frozenset(route.path for route in app.routes)
    # Added innermost first: the request id wraps everything, auth runs before the body guard reads anything, and
    # only an allowed body of an allowed size is counted against the upload budget.
    app.add_middleware(UploadBudgetMiddleware, budget=state.budget)
    app.add_middleware(BodyLimitMiddleware, limit_for=state.settings.body_limit,
                       timeout_s=state.settings.upload_timeout_s)
    app.add_middleware(ApiKeyMiddleware, checker=KeyChecker(api_key), public_paths=PUBLIC_PATHS)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics, route_paths=route_paths)
    return app


def _add_pages(app: FastAPI, auth: bool, settings: ServeSettings) -> None:
    page = (PAGE_FILE.read_text(encoding="utf-8").replace("{{AUTH}}", "true" if auth else "false")
            .replace("{{MAX_MB}}", f"{settings.max_upload_mb:g}"))
    docs: list[str] = []

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        if not docs:
            docs.append(render_docs(app.openapi()))
        return HTMLResponse(docs[0], headers=PAGE_HEADERS)


def _add_status_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health", response_model=Health, summary="Liveness: the process answers")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", response_model=Ready, summary="Readiness: the models are loaded and warmed up",
             responses={503: {"model": Ready, "description": "still loading, or loading failed"}})
    async def ready() -> Any:
        if state.service.ready:
            return {"ready": True, "detail": "models loaded"}
        detail = f"loading failed: {state.setup_error}" if state.setup_error else "loading the models"
        return JSONResponse({"ready": False, "detail": detail}, status_code=503)

    @app.get("/version", response_model=Version, summary="Code version, models (with checksums), class count")
    async def version() -> dict:
        return {**build_info(), **state.service.info}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


async def _read_upload(file: UploadFile, request: Request, settings: ServeSettings) -> Upload:
    data = await file.read(settings.max_file_bytes + 1)
    await file.close()  # frees its spooled temp file now rather than when the answer has been sent
    name = safe_filename(file.filename)
    if len(data) > settings.max_file_bytes:
        raise RequestRejected(413, f"Photo {name!r} is larger than {settings.max_upload_mb:g} MiB "
                                   f"(serving.max_upload_mb); send a smaller one", "too_large")
    rid = request_id_of(request.scope)
    return Upload(data, name, rid)


def _encode(result: dict, upload: Upload) -> dict:
    """The pipeline's result as the API answers it: the server-side image path is replaced by the client's name."""
    if "error" in result:
        return result
    body = {key: value for key, value in result.items() if key != "image"}
    return {**body, "request_id": upload.request_id, "filename": upload.filename}


def parse_hints(imprint: str | None, color: str | None, shape: str | None) -> Hints | None:
    """The user's hints, or None when none was given; a word the matcher does not know is a 422 naming it."""
    try:
        hints = Hints.parse(imprint, color, shape)
    except ValueError as err:
        raise RequestRejected(422, str(err), "bad_hint") from err
    return None if hints.empty() else hints


def _add_predict_routes(app: FastAPI, state: AppState) -> None:
    file_field = File(..., description="the photo (JPEG, PNG, WebP, AVIF, HEIC, BMP, TIFF or GIF)")
    mode_field = Form(Mode("auto"), description="single | combo | auto")
    imprint_field = Form(None, description="hint: the text printed or engraved on the pill (either side)")
    color_field = Form(None, description="hint: colour(s), e.g. white, 하양, 'white, red'")
    shape_field = Form(None, description="hint: shape, e.g. round, oval, 원형")

    async def predict_one(request: Request, file: UploadFile, mode: Any, hints: Any) -> dict:
        upload = await _read_upload(file, request, state.settings)
        result = await state.run_job("predict", request, state.service.predict, upload, Mode(mode).value, hints)
        state.metrics.predictions.labels(result["mode_used"]).inc()
        return _encode(result, upload)

    @app.post("/v1/predict", response_model=Prediction, responses=ERROR_RESPONSES,
              summary="Identify the pills in one photo")
    async def predict_v1(request: Request, file: UploadFile = file_field, mode: Mode = mode_field,
                         imprint: str | None = imprint_field, color: str | None = color_field,
                         shape: str | None = shape_field) -> dict:
        return await predict_one(request, file, mode, parse_hints(imprint, color, shape))

    @app.post("/predict", response_model=Prediction, responses=ERROR_RESPONSES, deprecated=True,
              summary="Identify the pills in one photo (use /v1/predict)")
    async def predict_legacy(request: Request, file: UploadFile = file_field, mode: Mode = mode_field) -> dict:
        return await predict_one(request, file, mode, None)

    @app.post("/v1/preview", responses={200: {"content": {"image/jpeg": {}}, "description": "the photo as a JPEG"},
                                        **ERROR_RESPONSES}, response_class=Response,
              summary="The photo upright, as a JPEG at most 1600 px (for browsers that cannot show HEIC)")
    async def preview(request: Request, file: UploadFile = file_field) -> Response:
        upload = await _read_upload(file, request, state.settings)
        return Response(await state.run_job("preview", request, state.service.preview, upload),
                        media_type="image/jpeg")

    @app.post("/v1/predict/batch", response_model=BatchPrediction, responses=ERROR_RESPONSES,
              summary="Identify the pills in several photos; a bad photo gets its own error entry")
    async def predict_batch(request: Request, files: list[UploadFile] = File(..., description="the photos"),
                            mode: Mode = mode_field, imprint: str | None = imprint_field,
                            color: str | None = color_field, shape: str | None = shape_field) -> dict:
        hints = parse_hints(imprint, color, shape)
        limit = state.settings.max_batch_files
        if len(files) > limit:
            raise RequestRejected(413, f"{len(files)} files in one batch; at most {limit} (serving.max_batch_files)",
                                  "too_many_files")
        slots: list[Upload | dict] = []
        for file in files:
            try:
                slots.append(await _read_upload(file, request, state.settings))
            except RequestRejected as err:
                slots.append({"filename": safe_filename(file.filename), "status": err.status, "error": err.code,
                              "detail": err.message})
        results = iter(await _predict_each(state, request, [s for s in slots if isinstance(s, Upload)], mode, hints))
        answers = [_encode(next(results), slot) if isinstance(slot, Upload) else slot for slot in slots]
        for answer in answers:
            if "error" not in answer:
                state.metrics.predictions.labels(answer["mode_used"]).inc()
        return {"request_id": request_id_of(request.scope), "results": answers}


async def _predict_each(state: AppState, request: Request, uploads: list[Upload], mode: Any, hints: Any) -> list[dict]:
    """A batch as one job per photo: a client that leaves mid-batch stops it at the next photo, and a single-photo
    request waits for one photo of a batch, not for all of it."""
    results: list[dict] = []
    for upload in uploads:
        results += await state.run_job("predict_batch", request, state.service.predict_many, [upload],
                                       Mode(mode).value, hints, admitted=bool(results))
    return results
