"""The AI Hub oral-drug data format: file names, folder patterns, label JSON parsing and writing, vocabularies.

Everything else in `pillsnap.data` reads or writes the format through this module only, so that the
synthetic generator and the real data set go through the same parser (see docs/REAL_DATA.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

# images[0] keys of every real label, in their fixed order (50 keys).
IMAGE_KEYS = (
    "file_name", "width", "height", "imgfile", "drug_N", "drug_S", "back_color", "drug_dir", "light_color",
    "camera_la", "camera_lo", "size", "dl_idx", "dl_mapping_code", "dl_name", "dl_name_en", "img_key",
    "dl_material", "dl_material_en", "dl_custom_shape", "dl_company", "dl_company_en", "di_company_mf",
    "di_company_mf_en", "item_seq", "di_item_permit_date", "di_class_no", "di_etc_otc_code", "di_edi_code",
    "chart", "drug_shape", "thick", "leng_long", "leng_short", "print_front", "print_back", "color_class1",
    "color_class2", "line_front", "line_back", "img_regist_ts", "form_code_name", "mark_code_front_anal",
    "mark_code_back_anal", "mark_code_front_img", "mark_code_back_img", "mark_code_front", "mark_code_back",
    "change_date", "id",
)

# File-name code -> JSON text. Only 0/정상알약, 2/연회색 배경, 0/앞면, 1/뒷면, 1/주광색, 2/주백색 are attested;
# the other entries are our own names so that the generator can vary backgrounds and lights.
DRUG_S = {"0": "정상알약"}
BACK_COLOR = {"0": "검은색 배경", "1": "청색 배경", "2": "연회색 배경"}
DRUG_DIR = {"0": "앞면", "1": "뒷면"}
LIGHT_COLOR = {"0": "백색", "1": "주광색", "2": "주백색"}
CAMERA_LA = (60, 70, 75, 90)
CAMERA_LO = tuple(range(0, 360, 20))
# JSON text -> file-name code, for checking a label's attributes against its file name (the source of truth).
# Only the attested words: a real label may spell an unattested code otherwise, or give our made-up word to
# another code, and neither may be read as a disagreement with its file name.
ATTESTED = {"drug_dir": ("0", "1"), "back_color": ("2",), "light_color": ("1", "2")}
_WORDS = {"drug_dir": DRUG_DIR, "back_color": BACK_COLOR, "light_color": LIGHT_COLOR}
TEXT_TO_CODE = {name: {_WORDS[name][code]: code for code in codes} for name, codes in ATTESTED.items()}

# The label vocabulary (drug_shape, color_class1/2, form_code_name: the MFDS pill-identification scheme), the one
# home of these words: the synthetic generator draws from it and the hint parser (pillsnap.infer.matching) maps
# people's words onto it. Most frequent first among the real classes, which the generator's weights follow.
SHAPES = ("타원형", "원형", "장방형", "반원형", "삼각형", "사각형", "마름모형", "오각형", "육각형", "팔각형", "기타")
COLORS = ("하양", "노랑", "분홍", "갈색", "주황", "빨강", "초록", "연두", "파랑", "청록", "남색", "자주", "보라",
          "회색", "검정", "투명")
FORMS = ("필름코팅정", "나정", "서방정", "연질캡슐제", "경질캡슐제", "장용성필름코팅정", "다층정", "저작정")

CODE_RE = re.compile(r"^K-\d{6}$")
IMAGE_DIR_RE = re.compile(r"^K-\d{6}(?:-\d{6}){0,3}$")
LABEL_DIR_RE = re.compile(r"^(K-\d{6}(?:-\d{6}){0,3})_json$")
STEM_RE = re.compile(r"^(K-\d{6}(?:-\d{6}){0,3})_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)_(\d+)$")
# Invisible characters seen at the end of real names (U+00A0, U+3000) besides ordinary whitespace.
_STRIP_CHARS = " \t\r\n\u00a0\u3000\ufeff"
# The manifest keeps sizes and boxes as int32 and camera angles as int16: a label or file name past these is broken.
INT32_MAX = 2**31 - 1
INT16_MAX = 2**15 - 1
# A lone UTF-16 surrogate (JSON's "\ud83d" escape without its pair): Python reads it, but no file can hold it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class LabelError(ValueError):
    """A label that cannot be used; `reason` is the counter name in the scan report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class FileNameInfo(NamedTuple):
    """Fields encoded in an AI Hub image/label file name (a NamedTuple: the scanner builds one per photo)."""

    stem: str
    codes: tuple[str, ...]  # one code for a single-pill photo, 3-4 (2-4 synthetic) for a combination
    drug_s: str
    back_color: str
    drug_dir: str
    light_color: str
    camera_la: int
    camera_lo: int
    size: int

    @property
    def folder(self) -> str:
        """The image folder name (`K-000030` or `K-001900-016548-...`)."""
        return "-".join([self.codes[0]] + [c[2:] for c in self.codes[1:]])

    @property
    def is_combination(self) -> bool:
        return len(self.codes) > 1


@dataclass
class LabelRecord:
    """One pill annotation: the same shape whether the label came from AI Hub or from the generator."""

    file_name: str
    mapping_code: str
    width: int
    height: int
    bbox: tuple[int, int, int, int]  # x, y, w, h in full-image pixels
    image_id: int
    drug_dir: str
    back_color: str
    light_color: str
    camera_la: int
    camera_lo: int
    info: dict[str, Any] = field(default_factory=dict)  # class-level display metadata (see class_info)
    n_boxes: int = 1  # annotations in the file: a label describes one pill, so more than one is a broken label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_text(value: Any) -> str:
    """`None` -> "", otherwise the string with real-data trailing/leading invisible whitespace removed."""
    text = value if type(value) is str else "" if value is None else str(value)
    if not text.isascii() and _LONE_SURROGATE.search(text):
        text = _LONE_SURROGATE.sub("\ufffd", text)
    return text.strip(_STRIP_CHARS)


def split_codes(folder: str) -> tuple[str, ...]:
    """`K-001900-016548-018110` -> ("K-001900", "K-016548", "K-018110")."""
    parts = folder.split("-")
    if parts[0] != "K" or len(parts) < 2:
        raise ValueError(f"Not a K-code folder name: {folder!r}")
    return tuple(f"K-{p}" for p in parts[1:])


def parse_file_name(name: str) -> FileNameInfo:
    """Parse `K-000030_0_2_0_1_90_300_200.png` (or .json, or the bare stem); ValueError names the file."""
    stem = name.rpartition("/")[2]
    if stem[-4:] in (".png", "json", ".jpg"):
        stem = stem.rpartition(".")[0]
    match = STEM_RE.match(stem)
    if not match:
        raise ValueError(f"Not an AI Hub file name (K-code + 7 numeric fields): {name!r}")
    folder, drug_s, back, ddir, light, la, lo, size = match.groups()
    if max(int(la), int(lo)) > INT16_MAX:
        raise ValueError(f"Not an AI Hub file name (camera angle {la}/{lo} out of range): {name!r}")
    return FileNameInfo(stem, split_codes(folder), drug_s, back, ddir, light, int(la), int(lo), int(size))


def _as_int(value: Any, name: str) -> int:
    if type(value) is int:  # the common case, kept cheap: the scanner calls this ~10x per file
        return value
    try:
        return int(round(float(value)))
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: "inf", or 1e400 read as infinity
        raise LabelError("bad_field", f"{name}={value!r} is not a number") from err


def _lenient_int(value: Any, unreadable: int) -> int:
    """A field nothing depends on (the file name is the truth for the camera angles; the image id is unused): a
    missing value is 0, one that is not a number is `unreadable`, never a reason to drop the label."""
    if not value:
        return 0
    try:
        return _as_int(value, "")
    except LabelError:
        return unreadable


def _split_list(value: Any) -> list[str]:
    return [p for p in (clean_text(x) for x in clean_text(value).split(",")) if p]


def parse_colors(image: dict[str, Any]) -> list[str]:
    """`color_class1` and `color_class2` as one list of colours, in order, without repeats.

    Real labels put several colours in one field ("노랑, 투명"), so each field is a comma-separated list.
    """
    colors: list[str] = []
    for key in ("color_class1", "color_class2"):
        colors += [c for c in _split_list(image.get(key)) if c not in colors]
    return colors


def has_multi_valued_color(image: dict[str, Any]) -> bool:
    """True when a colour field holds several colours (counted by the scan; parsed by parse_colors)."""
    first, second = image.get("color_class1"), image.get("color_class2")
    return (type(first) is str and "," in first) or (type(second) is str and "," in second)


def attribute_mismatches(rec: LabelRecord, info: FileNameInfo) -> list[str]:
    """Photo attributes where the label JSON disagrees with its file name (the file name is the truth).

    A JSON text outside the known vocabulary cannot be compared and is not reported.
    """
    wrong = []
    if rec.camera_la != info.camera_la:
        wrong.append("camera_la")
    if rec.camera_lo != info.camera_lo:
        wrong.append("camera_lo")
    for name, to_code in TEXT_TO_CODE.items():
        code = to_code.get(getattr(rec, name))
        if code is not None and code != getattr(info, name):
            wrong.append(name)
    return wrong


def file_name_attributes(info: FileNameInfo, rec: LabelRecord) -> tuple[str, str, str, int, int]:
    """(drug_dir, back_color, light_color, camera_la, camera_lo) to keep: the file name's codes as the real labels
    spell them (the JSON's own text for a code whose real spelling is not attested; our word only where the JSON
    gives none), and its camera angles."""
    def text(name: str, code: str, given: str) -> str:
        words = _WORDS[name]
        if code in ATTESTED[name] or not given or given in TEXT_TO_CODE[name]:  # never another code's real word
            return words.get(code, given or "")
        return given

    return (text("drug_dir", info.drug_dir, rec.drug_dir), text("back_color", info.back_color, rec.back_color),
            text("light_color", info.light_color, rec.light_color), info.camera_la, info.camera_lo)


def class_info(image: dict[str, Any]) -> dict[str, Any]:
    """Class-level display metadata of one label's images[0] (the class map entry without its index)."""
    colors = parse_colors(image)
    return {
        "mapping_code": clean_text(image.get("dl_mapping_code") or image.get("drug_N")),
        "name": clean_text(image.get("dl_name")),
        "name_en": clean_text(image.get("dl_name_en")),
        "company": clean_text(image.get("dl_company")),
        "edi_codes": _split_list(image.get("di_edi_code")),
        "shape": clean_text(image.get("drug_shape")),
        "colors": colors,
        "print_front": clean_text(image.get("print_front")),
        "print_back": clean_text(image.get("print_back")),
        "line_front": clean_text(image.get("line_front")),
        "line_back": clean_text(image.get("line_back")),
        "form": clean_text(image.get("form_code_name")),
    }


def _first(data: dict[str, Any], key: str) -> dict[str, Any]:
    items = data.get(key)
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise LabelError("bad_schema", f"'{key}' must be a non-empty list of objects")
    return items[0]


def _check_bbox(bbox: Any, width: int, height: int) -> tuple[int, int, int, int]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise LabelError("bad_schema", f"bbox {bbox!r} is not [x, y, w, h]")
    x, y, w, h = (_as_int(bbox[0], "bbox"), _as_int(bbox[1], "bbox"), _as_int(bbox[2], "bbox"),
                  _as_int(bbox[3], "bbox"))
    if w <= 0 or h <= 0:
        raise LabelError("bbox_zero_size", f"bbox {bbox} has zero or negative size")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise LabelError("bbox_outside_image", f"bbox {bbox} outside the {width}x{height} image")
    return x, y, w, h


def parse_label(data: Any, with_info: bool = True) -> LabelRecord:
    """One decoded label JSON -> LabelRecord; LabelError(reason) for records that must be skipped.

    The class is `dl_mapping_code` (falling back to `drug_N`); `categories` is never trusted.
    `with_info=False` skips the class metadata (the scanner needs it once per class, not once per file).
    """
    if not isinstance(data, dict):
        raise LabelError("bad_schema", "top level is not an object")
    image, ann = _first(data, "images"), _first(data, "annotations")
    code = clean_text(image.get("dl_mapping_code") or image.get("drug_N"))
    if not CODE_RE.match(code):
        raise LabelError("bad_code", f"mapping code {code!r} is not K- + 6 digits")
    width, height = _as_int(image.get("width"), "width"), _as_int(image.get("height"), "height")
    if not (0 < width <= INT32_MAX and 0 < height <= INT32_MAX):
        raise LabelError("bad_field", f"image size {width}x{height}")
    file_name = clean_text(image.get("file_name") or image.get("imgfile"))
    if not file_name:
        raise LabelError("bad_schema", "images[0].file_name is missing")
    return LabelRecord(
        file_name=file_name, mapping_code=code, width=width, height=height,
        bbox=_check_bbox(ann.get("bbox"), width, height), image_id=_lenient_int(image.get("id"), 0),
        drug_dir=clean_text(image.get("drug_dir")), back_color=clean_text(image.get("back_color")),
        light_color=clean_text(image.get("light_color")),
        # -1 where the JSON's angle is not a number: counted as an attribute mismatch with the file name
        camera_la=_lenient_int(image.get("camera_la"), -1), camera_lo=_lenient_int(image.get("camera_lo"), -1),
        info=class_info(image) if with_info else {},
        n_boxes=len(data["annotations"]),
    )


try:  # optional accelerator: orjson parses a label ~2.5x faster than json (2.6 M labels to scan)
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = json.loads
JSON_BACKEND = _fast_loads.__module__


def decode_label(raw: bytes | str) -> Any:
    """JSON-decode one label file; truncated or invalid JSON -> LabelError('bad_json')."""
    try:
        return _fast_loads(raw)
    except ValueError:  # orjson is stricter than json (NaN, huge ints): let json have the last word
        pass
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelError("bad_json", str(err)) from err


def load_label(raw: bytes | str) -> LabelRecord:
    """Decode and parse one label file's bytes (see parse_label)."""
    return parse_label(decode_label(raw))


def build_label(image_fields: dict[str, Any], bbox: tuple[int, int, int, int], image_id: int,
                ann_id: int) -> dict[str, Any]:
    """A label JSON object in the AI Hub original shape (50 images[0] keys in order, category 1 "Drug")."""
    missing = [k for k in IMAGE_KEYS if k not in image_fields and k != "id"]
    if missing:
        raise KeyError(f"build_label: missing images[0] fields {missing}")
    image = {k: image_fields[k] for k in IMAGE_KEYS if k != "id"}
    image["id"] = image_id
    x, y, w, h = (int(v) for v in bbox)
    return {
        "images": [image],
        "type": "instances",
        "annotations": [{"area": w * h, "iscrowd": 0, "bbox": [x, y, w, h], "category_id": 1, "ignore": 0,
                         "segmentation": [], "id": ann_id, "image_id": image_id}],
        "categories": [{"supercategory": "pill", "id": 1, "name": "Drug"}],
    }


def dump_label(label: dict[str, Any]) -> bytes:
    """Serialise like the real files: UTF-8, Korean unescaped, 4-space indent."""
    return json.dumps(label, ensure_ascii=False, indent=4).encode("utf-8")
