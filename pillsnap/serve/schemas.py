"""Response shapes of the API, for the OpenAPI document and to pin the contract.

`extra="allow"`: a field the pipeline adds passes through before this file names it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Candidate(BaseModel):
    model_config = ConfigDict(extra="allow")

    mapping_code: str = Field(description="drug code, K- and 6 digits")
    name: str = Field(description="drug name")
    edi_codes: list[str] = Field(default_factory=list, description="insurance (EDI) codes of the drug")
    probability: float = Field(description="probability of this drug: the classifier's (temperature-calibrated when "
                                           "the answer says calibrated: true), updated by the imprint read and the "
                                           "hints where they speak")
    classifier_probability: float | None = Field(None, description="the classifier's own probability, where the "
                                                                   "imprint or hints updated it")
    recalled_by_imprint: bool | None = Field(None, description="true for a drug the classifier ranked below the "
                                                               "top-k that the imprint read brought back: the read "
                                                               "is its imprint")


class SetMember(BaseModel):
    mapping_code: str = Field(description="drug code, K- and 6 digits")
    name: str = Field(description="drug name")
    probability: float = Field(description="its probability in the answer")


class Pill(Candidate):
    mapping_code: str | None = Field(description="drug code, K- and 6 digits; null for an unknown pill")
    probability: float | None = Field(description="probability of the named drug (see Candidate); null for an "
                                                  "unknown pill, which names none")
    prediction_set: list[SetMember] | None = Field(
        None, description="the drugs the pill may be, best first, holding the right one at `set_coverage` (a "
                          "conformal guarantee over pills answered by name, calibrated on validation answers); one "
                          "drug: a sure answer; empty for an unknown pill; null when the run has no calibrated sets")
    set_coverage: float | None = Field(None, description="the coverage the set is calibrated for (e.g. 0.95)")
    sure: bool | None = Field(None, description="the set holds exactly one drug (with sets filled to the coverage, "
                                                "the default, one at least that probable); null without a "
                                                "calibrated set")
    narrow_by: list[str] = Field(default_factory=list, description="what would shrink the set: other_side (photograph "
                                                                   "the other side) | imprint | color | shape (give "
                                                                   "that hint)")
    set_note: str | None = Field(None, description="the set in words when it holds several drugs")
    bbox: list[int] = Field(description="[x, y, w, h] in pixels of the upright photo (EXIF orientation applied)")
    det_confidence: float | None = Field(description="detector confidence; null for a single-pill answer")
    topk: list[Candidate] = Field(description="the best candidates; for an unknown pill, the nearest known drugs")
    unknown: bool = Field(False, description="true when no drug is named: the pill is not confidently one of the "
                                             "known drugs, or the box may hold no pill (unknown_by)")
    unknown_reason: str | None = Field(None, description="why the pill is answered as unknown")
    unknown_by: str | None = Field(None, description="what withheld the name: look (unlike every known drug, by "
                                                     "the run's unknown-pill rule) | imprint (a legible imprint that "
                                                     "none of the drugs it looks like carries) | box (the detector "
                                                     "is less sure the box holds a pill than of nearly every "
                                                     "validation pill: it may hold none); null when named")
    unknown_score: float | None = Field(None, description="how unlike every known drug the pill looks under the "
                                                          "run's unknown-pill rule (above its threshold: unknown); "
                                                          "null when the rule is off")
    imprint_read: str | None = Field(None, description="what the imprint reader read on the pill; null when it "
                                                       "was not read (reading off, or nothing a read could change)")
    imprint_unresolved: bool = Field(False, description="look-alike candidates differ only by an imprint that "
                                                        "could not be read: the other side, or the imprint typed "
                                                        "in, would settle it")
    ranking_changed: bool = Field(False, description="the imprint or the hints changed the classifier's answer")
    hints_conflict: bool = Field(False, description="the answer contradicts a hint the user gave")


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")

    request_id: str
    filename: str
    mode: str = Field(description="the mode asked for: single | combo | auto")
    mode_used: str = Field(description="the path taken: single | combo")
    fallback_reason: str | None = Field(description="why auto went to combo (null when it did not)")
    gating_score: float
    single_confidence: float | None = Field(description="top-1 probability of the whole-photo classification")
    num_detections: int | None = Field(None, description="boxes the detector found (null: no detector)")
    num_doubted: int = Field(0, description="of those, boxes that may hold no pill (the box check), answered as "
                                            "'maybe no pill'; auto counts one lying mostly inside another box as "
                                            "that pill's second box")
    flags: list[str] = Field(default_factory=list, description="no_pill_detected (auto: the detector saw no pill) | "
                                                                "no_sure_pill_detected (auto: the one box found may "
                                                                "hold no pill and is not where the whole-photo pill "
                                                                "is; that answer stands, the box beside it) | "
                                                                "detector_unavailable (the run has no detector) | "
                                                                "pill_limit_reached (inference.max_pills boxes found: "
                                                                "only the most confident that many are answered)")
    calibrated: bool = Field(False, description="probabilities are temperature-calibrated")
    num_pills: int
    image_size: list[int] = Field(description="[width, height] of the upright photo")
    elapsed_ms: float = Field(description="pipeline time, decoding excluded")
    hard_case: list[str] = Field(default_factory=list, description="why this answer deserves review (if it does)")
    pills: list[Pill]


class FileError(BaseModel):
    filename: str
    status: int = Field(description="the HTTP status this photo alone would have got")
    error: str
    detail: str


class BatchPrediction(BaseModel):
    request_id: str
    results: list[Prediction | FileError] = Field(description="one entry per uploaded file, in upload order")


class ErrorResponse(BaseModel):
    detail: str = Field(description="what went wrong and what to do about it")
    error: str = Field(description="stable machine-readable code")
    request_id: str = Field(description="also in the X-Request-ID header and the server log")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    detail: str


class Version(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    package: str
    version: str
    git_sha: str
    api: str
    backend: str | None = None
    num_classes: int | None = None
    models: dict = Field(default_factory=dict, description="role -> file, sha256, bytes")
    calibration: dict | None = Field(None, description="null until calibration lands")


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "unreadable or empty photo", 401: "missing or wrong API key", 408: "upload too slow",
    413: "body or photo too large", 422: "photo too small, or invalid form fields", 503: "busy or still loading",
}.items()}


class EnrolledDrug(BaseModel):
    model_config = ConfigDict(extra="allow")

    mapping_code: str = Field(description="drug code, K- and 6 digits")
    name: str = Field(description="drug name, as answers show it")
    print_front: str | None = Field(None, description="imprint on the front, as given")
    print_back: str | None = Field(None, description="imprint on the back, as given")
    colors: list[str] = Field(default_factory=list, description="colours, label words (하양, 노랑, ...)")
    shape: str | None = Field(None, description="shape, a label word (원형, 타원형, ...)")
    n_photos: int = Field(description="photos it was enrolled from")
    enrolled_at: str | None = Field(None, description="when, UTC ISO 8601")


class EnrolList(BaseModel):
    drugs: list[EnrolledDrug] = Field(description="the enrolled drugs, in the order they were enrolled")
    stale: str | None = Field(None, description="set when the enrolments were made for other classifier weights: "
                                                "they are listed but not answered, and why")


class Enrolment(BaseModel):
    model_config = ConfigDict(extra="allow")

    mapping_code: str
    name: str
    n_photos: int
    replaced: bool = Field(description="an enrolled drug of this code was enrolled again (replace: true)")
    look_alike: dict | None = Field(None, description="with force: true, the existing drug the photos look like")
    takes_known: dict | None = Field(
        None, description="what the drug takes from the trained drugs, on the calibration's validation probe: "
                          "`crops` of the `of` answered right that it answers instead by their look (`share`), most "
                          "from `mapping_code` (`drug_crops` of `drug_of`); `refused`: too much (at least 2, and a "
                          "quarter of one drug's or 1% of all: 409 takes_known without force: true); `measured: "
                          "false` and `why` when the calibration has no probe (made before it, or its file is not "
                          "the one it names)")
    crops: list[dict] = Field(description="per photo, how its pill was found")
    elapsed_s: float


class EnrolRemoved(BaseModel):
    removed: str = Field(description="the code removed")
    name: str
