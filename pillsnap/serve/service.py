"""The model side of the API, LitServe-style (setup -> decode request -> predict -> encode), with no HTTP in it:
load and warm up the predictor, decode uploads with the one shared decoder, predict, keep the upload of every hard
case so that its record points at a file someone can look at.

Everything here runs on an InferenceRunner worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pillsnap.infer.hard_cases import KeptFiles, for_request  # PIL only: no model code
from pillsnap.serve.errors import RequestRejected, image_error_status
from pillsnap.utils.images import PHOTO_SUFFIXES, ImageError, ImageLimits, decode_image
from pillsnap.utils.logs import FailureRun

LOGGER = logging.getLogger(__name__)
GIT_SHA_ENV = "PILLSNAP_GIT_SHA"  # set in images built without .git
UPLOAD_SUFFIXES = PHOTO_SUFFIXES
PREVIEW_SIDE = 1600  # px on the long side of the page's preview of a photo the browser cannot show


@dataclass(frozen=True)
class Upload:
    """One uploaded photo: its bytes, the client's file name and the (sanitised) id of the request it came with.
    Neither names a kept file: the store makes its own names, so a reused request id overwrites nothing."""

    data: bytes
    filename: str
    request_id: str


class PredictorLike(Protocol):
    """What the service needs of pillsnap.infer.Predictor (tests pass stand-ins)."""

    backend: str
    class_names: list[str]
    has_detector: bool

    def predict(self, image: Any, mode: str | None = None, conf_threshold: float | None = None,
                name: str | None = None, hints: Any = None) -> dict: ...

    def warm_up(self) -> None: ...

    def model_files(self) -> dict[str, Path]: ...


class NotReady(RequestRejected):
    def __init__(self) -> None:
        super().__init__(503, "The models are still loading; retry shortly (GET /ready says when)", "not_ready")


class PredictionService:
    """Holds the predictor once `setup()` has loaded it; `predict` turns one upload into one result dict."""

    def __init__(self, load_predictor: Callable[[], PredictorLike], limits: ImageLimits,
                 uploads: KeptFiles | None = None) -> None:
        self._load_predictor = load_predictor
        self.limits = limits
        self.uploads = uploads  # None: hard cases are not logged, so uploads are never kept
        self._keep_failures = FailureRun(LOGGER)  # hard-case uploads that could not be kept
        self.predictor: PredictorLike | None = None
        self.info: dict = {}

    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def setup(self) -> None:
        """Load the models, run them once, fingerprint them (slow: call it from a worker thread)."""
        start = time.perf_counter()
        predictor = self._load_predictor()
        predictor.warm_up()
        self.info = describe_models(predictor)
        self.predictor = predictor
        LOGGER.info("models ready in %.1f s (%s backend, %d classes)", time.perf_counter() - start,
                    predictor.backend, len(predictor.class_names))

    def predict(self, upload: Upload, mode: str, hints: Any = None) -> dict:
        """Decode, predict, keep the upload when the answer is a hard case. Raises ImageError for a photo the
        decoder refuses and RequestRejected for an empty one."""
        if self.predictor is None:
            raise NotReady()
        if mode == "combo" and not self.predictor.has_detector:
            raise RequestRejected(409, "This model has no detector, and combo mode needs one: send mode=auto or "
                                  "single (a photo of one pill)", "no_detector")
        image = self._decode(upload)
        reference = self._upload_path(upload)
        with for_request(upload.request_id):  # the hard-case record names the request
            result = self.predictor.predict(image, mode=mode, name=str(reference) if reference else upload.filename,
                                            hints=hints)
        if reference is not None and self.uploads is not None and result.get("hard_case"):
            try:
                self.uploads.keep(reference, upload.data)
            except OSError as err:  # a full disk or a read-only folder loses the kept photo, never the answer
                self._keep_failures.failed(f"upload {upload.filename!r} of a hard case not kept ({err}): the answer "
                                           "is given")
            else:
                self._keep_failures.passed()
        return result

    def preview(self, upload: Upload, side: int = PREVIEW_SIDE) -> bytes:
        """The upright photo as a JPEG at most `side` px on its long side, for a browser that cannot show the
        upload itself (HEIC outside Safari). Raises what `predict` raises for the photo; needs no model."""
        image = self._decode(upload)
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    def _decode(self, upload: Upload) -> Any:
        if not upload.data:
            raise RequestRejected(400, f"Empty upload {upload.filename!r}: send the photo's bytes in the form field",
                                  "empty_upload")
        return decode_image(upload.data, repr(upload.filename), self.limits)

    def predict_many(self, uploads: list[Upload], mode: str, hints: Any = None) -> list[dict]:
        """One result per upload; a refused photo gets its own error entry and the others are still answered."""
        return [self._predict_or_error(upload, mode, hints) for upload in uploads]

    def _predict_or_error(self, upload: Upload, mode: str, hints: Any = None) -> dict:
        try:
            return self.predict(upload, mode, hints)
        except ImageError as err:
            status, code = image_error_status(err)
            return {"filename": upload.filename, "status": status, "error": code, "detail": str(err)}
        except RequestRejected as err:
            return {"filename": upload.filename, "status": err.status, "error": err.code, "detail": err.message}
        except Exception as err:  # one photo's boundary in a batch: it must not cost the other photos their answers
            LOGGER.error("request %s: %s failed: %s", upload.request_id, upload.filename, type(err).__name__,
                         exc_info=err)
            return {"filename": upload.filename, "status": 500, "error": "internal_error",
                    "detail": f"Internal error; the server log has the details under request id {upload.request_id}"}

    def _upload_path(self, upload: Upload) -> Path | None:
        if self.uploads is None:
            return None
        suffix = Path(upload.filename).suffix.lower()
        return self.uploads.new_path(suffix if suffix in UPLOAD_SUFFIXES else ".img")


def describe_models(predictor: PredictorLike) -> dict:
    """What /version reports about the models: backend, class count, each file with its SHA-256, the calibration
    (temperature, unknown-pill thresholds; null when the run was not calibrated), the unknown-pill rule in force
    (its threshold is null and `active` false when it is off), the prediction-set rule, the box check and, with the
    onnx backend, the onnxruntime providers the classifier runs on (null with torch)."""
    from pillsnap.utils.io import file_sha256

    files = predictor.model_files()
    return {"backend": predictor.backend, "device": str(getattr(predictor, "device", "cpu")),
            "num_classes": len(predictor.class_names),
            "models": {role: {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
                       for role, path in files.items()},
            "calibration": getattr(predictor, "calibration", None),
            "unknown_rule": _unknown_rule(getattr(predictor, "unknown", None)),
            "prediction_set": _set_rule(getattr(predictor, "set_rule", None)),
            "box_check": _box_check(predictor),
            # with the onnx backend, what onnxruntime runs the classifier on (it falls back to the CPU silently)
            "onnx_providers": getattr(getattr(predictor, "classifier", None), "providers", None)}


def _set_rule(rule: Any) -> dict | None:
    """The prediction-set rule in force (null: answers carry no set), with the crop sources calibrated to keep the
    coverage on their own answers, and those whose answers carry no set (their candidates miss the right drug too
    often); the others keep it over all answers."""
    if rule is None:
        return None
    return {"method": rule.method, "coverage": rule.coverage, "filled_to_coverage": rule.fill,
            "sources_with_own_threshold": sorted(rule.by_source or {}),
            "sources_without_set": sorted(rule.refused or {})}


def _box_check(predictor: Any) -> dict:
    """Whether detector boxes are checked for holding a pill, and the bound at the configured detection threshold."""
    from pillsnap.infer.box_check import describe

    check = getattr(predictor, "box_check", None) if getattr(predictor, "has_detector", False) else None
    if check is None:
        return {"active": False}
    described = describe(check, float(predictor.settings.conf_threshold))
    return {"active": True, **{key: described[key] for key in ("miss_rate", "bound", "pills")}}


def _unknown_rule(unknown: Any) -> dict | None:
    if unknown is None:
        return None
    return {"rule": unknown.rule, "threshold": unknown.threshold, "active": unknown.active}


def build_info() -> dict:
    """Package version and git SHA of the running code."""
    import pillsnap
    from pillsnap.utils.logs import get_git_sha

    sha = os.environ.get(GIT_SHA_ENV) or get_git_sha(Path(pillsnap.__file__).resolve().parent)
    return {"package": "pillsnap", "version": pillsnap.__version__, "git_sha": sha, "api": "v1",
            "python": platform.python_version()}


def safe_filename(name: str | None) -> str:
    """The client's file name without any folder part or non-printable character (it is echoed back and logged:
    C1 controls, U+0085 and U+2028 break or drive a log line as well as a newline or ESC does)."""
    base = re.split(r"[\\/]", name or "")[-1]
    return "".join(c for c in base if c.isprintable())[:200] or "upload"
