"""Synthetic AI Hub data set: the real folder layout and label JSON, with drawn pill photos.

Deterministic for a seed (each photo has its own seed, so parallel rendering does not change the bytes).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from pillsnap.data import aihub
from pillsnap.data.synth_pill import LOGO_STYLES, LOGO_WORD, SCORE_WORD, PillLook, imprint_parts
from pillsnap.data.synth_render import FULL_H, FULL_W, PhotoConditions, render_photo, style_of
from pillsnap.data.synth_style import PhotoStyle
from pillsnap.utils.devices import usable_cores
from pillsnap.utils.pools import forked_imap

LOGGER = logging.getLogger(__name__)
ROOT_NAME = "166.약품식별 인공지능 개발을 위한 경구약제 이미지 데이터"
SINGLE_DIR, COMBO_DIR = "단일경구약제 5000종", "경구약제조합 5000종"
CLASSES_PER_ZIP = 50  # like the real TS_k_단일 zips (~50 drug codes each)
COMBOS_PER_ZIP = 1000
COMBO_ANGLES = (70, 75, 90)  # camera elevations of the real combination photos
HARD_RATIO = 0.25  # share of classes that copy a neighbour's shape and colour, differing only by imprint
# Class distributions of the 73 real classes of the competition subset (docs/REAL_DATA.md).
# Weights in the order of the label vocabulary (pillsnap.data.aihub); no chewable tablet (저작정, last) among them.
SHAPE_WEIGHTS = dict(zip(aihub.SHAPES, (29, 24, 16, 0.4, 0.4, 0.5, 0.4, 0.4, 0.4, 0.3, 0.2), strict=True))
COLOR_WEIGHTS = dict(zip(aihub.COLORS, (24, 14, 13, 8, 5, 3, 2, 1, 1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.1, 0.2), strict=True))
FORM_WEIGHTS = dict(zip(aihub.FORMS, (45, 11, 5, 4, 3, 2, 1, 0), strict=True))
# Shades per colour name: real pills are mostly white or off-white, and most coloured ones are pale.
SHADES = {
    "하양": ((247, 247, 243), (242, 240, 232), (236, 233, 222), (244, 245, 247), (238, 236, 228)),
    "노랑": ((244, 232, 170), (240, 220, 130), (232, 200, 92), (246, 238, 196)),
    "분홍": ((242, 208, 210), (234, 180, 190), (224, 156, 172), (246, 222, 220)),
    "갈색": ((176, 128, 88), (150, 100, 66), (196, 156, 116), (122, 76, 48)),
    "주황": ((242, 176, 108), (234, 146, 78), (246, 200, 150)),
    "빨강": ((204, 76, 74), (180, 56, 62), (216, 110, 98)),
    "초록": ((112, 164, 112), (84, 142, 100)), "연두": ((196, 218, 148), (174, 204, 124)),
    "파랑": ((124, 164, 216), (96, 134, 202)), "청록": ((80, 170, 168),), "남색": ((64, 74, 132),),
    "자주": ((156, 70, 126),), "보라": ((156, 118, 196),), "회색": ((176, 176, 176),), "검정": ((52, 52, 56),),
    "투명": ((226, 230, 218),),
}
_SYLLABLES = "가나다라마바사아자차카타파하고노도로모보소오조코토포호구누두루무부수우주쿠투푸후"
_COMPANIES = ("한빛제약(주)", "대성약품(주)", "미래바이오(주)", "서해제약(주)", "청솔약품(주)", "동녘제약(주)")
_IMPRINT_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
MARK_SHARE, LOGO_ONLY_SHARE, SCORE_SHARE = 0.18, 0.35, 0.1  # of tablet classes (real: 13 and 7 of 73 classes)


@dataclass(frozen=True)
class DrugClass:
    code: str
    look: PillLook
    form: str
    fields: dict  # class-level images[0] fields (dl_*, di_*, drug_shape, print_*, ...)


@dataclass(frozen=True)
class PhotoJob:
    """One photo to render: which classes, which conditions, where it goes."""

    index: int
    classes: tuple[int, ...]
    cond: PhotoConditions
    stem: str
    folder: str
    zip_no: int
    seed: int
    layout_seed: int  # shared by the shots of one combination (same arrangement at every camera angle)


def _imprint(rng: random.Random, low: int = 2, high: int = 5) -> str:
    return "".join(rng.choice(_IMPRINT_CHARS) for _ in range(rng.randint(low, high)))


def _front_label(rng: random.Random, kind: str) -> str:
    """A front imprint label of one kind, written as the real labels write it: "" (plain), "text", "logo"
    ("마크": the logo alone), "logo_text" ("마크213" or "마크 A1") or "score" ("I분할선Y": a score line between
    characters)."""
    if kind == "logo":
        return LOGO_WORD
    if kind == "logo_text":
        return LOGO_WORD + rng.choice(("", " ")) + _imprint(rng, 1, 4)
    if kind == "score":
        text = _imprint(rng, 2, 4)
        cut = len(text) // 2
        return text[:cut] + SCORE_WORD + text[cut:]
    return _imprint(rng) if kind == "text" else ""


def _front_kind(label: str) -> str:
    """The kind (_front_label) of a front label."""
    logo, pieces = imprint_parts(label)
    if logo:
        return "logo_text" if pieces else "logo"
    return "score" if len(pieces) > 1 else ("text" if pieces else "")


def _pick_front_kind(rng: random.Random, capsule: str) -> str:
    """Real classes: a logo on 13 of 73 (the logo alone on about a third of them, the text then on the back), a
    score line between front characters on 7 of 73; 97 % carry a front imprint. Capsules are printed: text only."""
    roll = rng.random()
    if not capsule and roll < MARK_SHARE:
        return "logo" if rng.random() < LOGO_ONLY_SHARE else "logo_text"
    if not capsule and roll < MARK_SHARE + SCORE_SHARE:
        return "score"
    return "text" if rng.random() < 0.97 else ""


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _shade(rng: random.Random, color: str) -> tuple[int, int, int]:
    base = rng.choice(SHADES[color])
    return tuple(max(0, min(255, c + rng.randint(-6, 6))) for c in base)  # type: ignore[return-value]


def _size_mm(rng: random.Random, shape: str, capsule: str) -> tuple[float, float]:
    """(long, short) in mm: round 6.5-12 mm, oval 11-19 mm, caplets 15-22 mm (fitted to the real box sizes)."""
    if capsule == "hard":
        long_mm = rng.uniform(16.0, 22.0)
        return long_mm, long_mm * rng.uniform(0.34, 0.42)
    if shape in ("원형", "사각형", "육각형", "팔각형", "오각형", "삼각형", "마름모형"):
        side = rng.uniform(7.0, 12.0)
        return side, side if shape != "마름모형" else side * rng.uniform(0.7, 0.85)
    if shape == "장방형":
        long_mm = rng.uniform(15.0, 22.0)
        return long_mm, long_mm * rng.uniform(0.38, 0.5)
    long_mm = rng.uniform(10.0, 17.0) if shape != "반원형" else rng.uniform(8.0, 11.0)
    return long_mm, long_mm * rng.uniform(0.55, 0.75)


def _colors(rng: random.Random, capsule: str, form: str) -> tuple[str, ...]:
    first = _pick(rng, COLOR_WEIGHTS)
    if (capsule == "hard" and rng.random() < 0.7) or form == "다층정":  # two-tone capsule, two-layer tablet
        return first, _pick(rng, {k: v for k, v in COLOR_WEIGHTS.items() if k != first})
    return (first,)


def _random_look(rng: random.Random, form: str) -> PillLook:
    capsule = {"경질캡슐제": "hard", "연질캡슐제": "soft"}.get(form, "")
    shape = _pick(rng, SHAPE_WEIGHTS)
    if capsule:
        shape = "장방형" if capsule == "hard" or rng.random() < 0.3 else "타원형"
    colors = _colors(rng, capsule, form)
    long_mm, short_mm = _size_mm(rng, shape, capsule)
    kind = _pick_front_kind(rng, capsule)
    # a logo alone on the front leaves the text to the back, as on the real pills that carry one
    back = _imprint(rng) if kind == "logo" or rng.random() < 0.45 else ""
    return PillLook(
        shape=shape, capsule=capsule, colors=colors, rgb=tuple(_shade(rng, c) for c in colors),
        print_front=_front_label(rng, kind), print_back=back, logo=rng.randrange(len(LOGO_STYLES)),
        line_front="-" if kind == "score" else "", line_back="",
        ink=bool(capsule) or rng.random() < 0.08,
        gloss={"soft": 1.0, "hard": 0.6}.get(capsule, 0.1 if form == "나정" else 0.35),
        long_mm=long_mm, short_mm=short_mm, base_angle=rng.uniform(0, 360),
    )


def _twin_look(rng: random.Random, twin: PillLook) -> PillLook:
    """Same shape, colour, size and logo as `twin`, imprints of the same kind; only their text differs (a
    deliberately hard pair: with a logo-only front, only the back tells them apart)."""
    front = _front_label(rng, _front_kind(twin.print_front))
    return replace(twin, print_front=front, print_back=_imprint(rng) if twin.print_back else "",
                   base_angle=rng.uniform(0, 360))


def _class_fields(code: str, look: PillLook, form: str, rng: random.Random) -> dict[str, Any]:
    number = int(code[2:])
    name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
    dose = rng.choice((5, 10, 20, 25, 50, 100, 200, 250, 500))
    suffix = "캡슐" if look.capsule else "정"
    edi = ",".join(str(rng.randint(600000000, 699999999)) for _ in range(rng.choice((1, 1, 2))))
    return {
        "dl_idx": str(number - 1), "dl_mapping_code": code,
        # real names carry trailing U+00A0 now and then; keep that quirk so that cleaning is exercised
        "dl_name": f"{name}{suffix} {dose}mg" + ("\u00a0" if rng.random() < 0.1 else ""),
        "dl_name_en": f"Synth{number} {'Cap.' if look.capsule else 'Tab.'} {dose}mg",
        "img_key": None, "dl_material": "합성성분", "dl_material_en": "Synthetic ingredient",
        "dl_custom_shape": {"hard": "경질캡슐", "soft": "연질캡슐"}.get(look.capsule, "정제"),
        "dl_company": rng.choice(_COMPANIES),
        "dl_company_en": "Synthetic Pharm", "di_company_mf": "", "di_company_mf_en": "",
        "item_seq": 200000000 + number, "di_item_permit_date": "20200101", "di_class_no": "[00000]합성",
        "di_etc_otc_code": rng.choice(("전문의약품", "일반의약품")), "di_edi_code": edi, "chart": None,
        "drug_shape": look.shape, "thick": round(rng.uniform(2.5, 7.0), 1), "leng_long": round(look.long_mm, 1),
        "leng_short": round(look.short_mm, 1), "print_front": look.print_front, "print_back": look.print_back,
        # soft capsules are labelled like the real ones now and then: two colours in one field ("노랑, 투명")
        "color_class1": f"{look.colors[0]}, 투명" if look.capsule == "soft" and number % 2 else look.colors[0],
        "color_class2": look.colors[1] if len(look.colors) > 1 else "",
        "line_front": look.line_front, "line_back": look.line_back, "img_regist_ts": "20200101",
        "form_code_name": form, "mark_code_front_anal": "", "mark_code_back_anal": "", "mark_code_front_img": "",
        "mark_code_back_img": "", "mark_code_front": "", "mark_code_back": "", "change_date": "20200101",
    }


def make_classes(num_classes: int, seed: int) -> list[DrugClass]:
    """`num_classes` stable drug identities (codes ascending), some of them hard twins of their neighbour."""
    rng = random.Random(f"classes:{seed}")
    numbers = sorted(rng.sample(range(1, 45000), num_classes))
    classes: list[DrugClass] = []
    for number in numbers:
        code = f"K-{number:06d}"
        if classes and rng.random() < HARD_RATIO:
            twin = classes[-1]
            look, form = _twin_look(rng, twin.look), twin.form
        else:
            form = _pick(rng, FORM_WEIGHTS)
            look = _random_look(rng, form)
        classes.append(DrugClass(code, look, form, _class_fields(code, look, form, rng)))
    return classes


def _condition_grid() -> list[PhotoConditions]:
    return [PhotoConditions(d, b, lc, la, lo) for b in aihub.BACK_COLOR for d in aihub.DRUG_DIR
            for lc in ("1", "2") for la in aihub.CAMERA_LA for lo in aihub.CAMERA_LO]


def _stem(folder: str, cond: PhotoConditions) -> str:
    return f"{folder}_0_{cond.back_color}_{cond.drug_dir}_{cond.light_color}_{cond.camera_la}_{cond.camera_lo:03d}_200"


def _photo_seed(seed: int, stem: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{stem}".encode()).digest()[:8], "little")


def _single_jobs(classes: list[DrugClass], per_class: int, seed: int) -> Iterator[PhotoJob]:
    grid = _condition_grid()
    index = 0
    for ci, drug in enumerate(classes):
        # Most real photos use the light-grey background; the others appear less often.
        weights = [6.0 if c.back_color == "2" else 1.0 for c in grid]
        chosen = _weighted_sample(grid, weights, per_class, random.Random(f"single:{seed}:{drug.code}"))
        for cond in chosen:
            stem = _stem(drug.code, cond)
            photo_seed = _photo_seed(seed, stem)
            yield PhotoJob(index, (ci,), cond, stem, drug.code, ci // CLASSES_PER_ZIP + 1, photo_seed, photo_seed)
            index += 1


def _weighted_sample(items: list, weights: list[float], k: int, rng: random.Random) -> list:
    keyed = sorted(range(len(items)), key=lambda i: -rng.random() ** (1.0 / weights[i]))  # Efraimidis-Spirakis
    return [items[i] for i in keyed[:k]]


def _combination_sets(classes: list[DrugClass], count: int, rng: random.Random) -> list[tuple[tuple[int, ...], str]]:
    """`count` combinations of 3-4 distinct classes (fewer when there are fewer classes), distinct where possible."""
    sets: list[tuple[tuple[int, ...], str]] = []
    seen: set[str] = set()  # a set, not a scan of `sets`: thousands of combinations at the full data set's scale
    for _ in range(count):
        for _attempt in range(20):
            k = min(len(classes), rng.choice((3, 4)))
            members = tuple(sorted(rng.sample(range(len(classes)), k)))
            folder = "-".join([classes[members[0]].code] + [classes[i].code[2:] for i in members[1:]])
            if folder not in seen:
                break
        sets.append((members, folder))
        seen.add(folder)
    return sets


def _combo_jobs(classes: list[DrugClass], combo: int, seed: int, start: int) -> Iterator[PhotoJob]:
    """`combo` photos: each combination is shot at up to three elevations (70, 75, 90 degrees, like the real ones)
    with the pills in the same places; a set too small for three combinations per shot takes fewer shots."""
    rng = random.Random(f"combo:{seed}")
    n_sets = max(math.ceil(combo / len(COMBO_ANGLES)), min(combo, 3))
    sets = _combination_sets(classes, n_sets, rng)
    base = [PhotoConditions("1" if rng.random() < 0.2 else "0", "2", "2" if rng.random() < 0.8 else "1", 70, 0)
            for _ in sets]
    used: set[str] = set()
    for n in range(combo):
        members, folder = sets[n % n_sets]
        cond = replace(base[n % n_sets], camera_la=COMBO_ANGLES[(n // n_sets) % len(COMBO_ANGLES)])
        while _stem(folder, cond) in used:  # a repeated combination (few classes): another side or light
            cond = replace(cond, drug_dir=rng.choice("01"), light_color=rng.choice("12"),
                           camera_lo=rng.choice(aihub.CAMERA_LO))
        stem = _stem(folder, cond)
        used.add(stem)
        zip_no = (n % n_sets) * len(COMBO_ANGLES) // COMBOS_PER_ZIP + 1  # all shots of a combination in one zip
        yield PhotoJob(start + n, members, cond, stem, folder, zip_no, _photo_seed(seed, stem),
                       _photo_seed(seed, f"{folder}:{cond.drug_dir}:{cond.light_color}"))


def dataset_styles(num_classes: int, per_class: int, combo: int, seed: int = 0) -> dict[str, PhotoStyle]:
    """The photo style (backdrop, dish, light, blur, noise, JPEG) of every photo generate_dataset writes for these
    arguments, by file stem: what each photo got, without a side file next to the AI Hub layout."""
    classes = make_classes(num_classes, seed)
    jobs = [*_single_jobs(classes, per_class, seed), *_combo_jobs(classes, combo, seed, 0)]
    return {job.stem: style_of([classes[i].look for i in job.classes], job.cond, job.seed, job.layout_seed)
            for job in jobs}


def _label_fields(drug: DrugClass, job: PhotoJob, size: tuple[int, int]) -> dict[str, Any]:
    cond = job.cond
    return {
        "file_name": f"{job.stem}.png", "width": size[0], "height": size[1], "imgfile": f"{job.stem}.png",
        "drug_N": drug.code, "drug_S": aihub.DRUG_S["0"], "back_color": aihub.BACK_COLOR[cond.back_color],
        "drug_dir": aihub.DRUG_DIR[cond.drug_dir], "light_color": aihub.LIGHT_COLOR[cond.light_color],
        "camera_la": cond.camera_la, "camera_lo": cond.camera_lo, "size": 200, **drug.fields,
    }


_WORKER_CLASSES: list[DrugClass] = []


def _render_job(job: PhotoJob, image_scale: float) -> tuple[PhotoJob, bytes, list[bytes]]:
    looks = [_WORKER_CLASSES[i].look for i in job.classes]
    png, boxes, size = render_photo(looks, job.cond, image_scale, job.seed, job.layout_seed)
    labels = []
    for ann_no, (ci, box) in enumerate(zip(job.classes, boxes, strict=True)):
        fields = _label_fields(_WORKER_CLASSES[ci], job, size)
        labels.append(aihub.dump_label(aihub.build_label(fields, box, job.index + 1, ann_no + 1)))
    return job, png, labels


@lru_cache(maxsize=4)
def _placeholder_png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 100, 140)).save(buf, "PNG")  # the real backdrop's blue-grey
    return buf.getvalue()


def _placeholder_job(job: PhotoJob, image_scale: float) -> tuple[PhotoJob, bytes, list[bytes]]:
    """A flat photo with the pills' boxes on a 2x2 grid, and the same labels as a rendered photo: the real layout
    and label JSON at scale without rendering (rehearsals of hundreds of thousands of rows)."""
    size = (max(8, round(FULL_W * image_scale)), max(8, round(FULL_H * image_scale)))
    cell_w, cell_h = size[0] // 2, size[1] // 2
    labels = []
    for ann_no, ci in enumerate(job.classes):
        x, y = (ann_no % 2) * cell_w, (ann_no // 2) * cell_h
        box = (x + cell_w // 8, y + cell_h // 8, max(1, cell_w * 3 // 4), max(1, cell_h * 3 // 4))
        fields = _label_fields(_WORKER_CLASSES[ci], job, size)
        labels.append(aihub.dump_label(aihub.build_label(fields, box, job.index + 1, ann_no + 1)))
    return job, _placeholder_png(size), labels


def _init_worker(classes: list[DrugClass]) -> None:
    global _WORKER_CLASSES
    _WORKER_CLASSES = classes


class _Writer:
    """Writes images and labels into the extracted tree or into TS_/TL_ zips (members as in the real zips)."""

    def __init__(self, out_dir: Path, zip_output: bool) -> None:
        self.base = out_dir / ROOT_NAME / "01.데이터" / "1.Training"
        self.zip_output = zip_output
        self._zips: dict[Path, zipfile.ZipFile] = {}

    def _container(self, kind: str, role: str, zip_no: int) -> Path:
        top = "원천데이터" if role == "image" else "라벨링데이터"
        prefix = "TS" if role == "image" else "TL"
        tag = "단일" if kind == "single" else "조합"
        return self.base / top / (SINGLE_DIR if kind == "single" else COMBO_DIR) / f"{prefix}_{zip_no}_{tag}"

    def put(self, kind: str, role: str, zip_no: int, member: str, data: bytes) -> None:
        container = self._container(kind, role, zip_no)
        if self.zip_output:
            path = container.with_suffix(".zip")
            if path not in self._zips:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._zips[path] = zipfile.ZipFile(path, "w")
            method = zipfile.ZIP_STORED if member.endswith(".png") else zipfile.ZIP_DEFLATED
            self._zips[path].writestr(member, data, compress_type=method)
            return
        target = container / member
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def close(self) -> None:
        for zf in self._zips.values():
            zf.close()


def _store(writer: _Writer, classes: list[DrugClass], job: PhotoJob, png: bytes, labels: list[bytes],
           index_written: set[str]) -> None:
    kind = "combination" if len(job.classes) > 1 else "single"
    writer.put(kind, "image", job.zip_no, f"{job.folder}/{job.stem}.png", png)
    for ci, label in zip(job.classes, labels, strict=True):
        sub = f"{job.folder}_json/{classes[ci].code}/" if kind == "combination" else f"{job.folder}_json/"
        writer.put(kind, "label", job.zip_no, f"{sub}{job.stem}.json", label)
    if kind == "combination" and job.folder not in index_written:
        # Real combination folders also hold '*index.png' overview images that ingestion must skip.
        writer.put(kind, "image", job.zip_no, f"{job.folder}/{job.folder}_index.png", png)
        index_written.add(job.folder)


def _check_args(num_classes: int, per_class: int, combo: int, image_scale: float) -> None:
    grid = len(_condition_grid())
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 1 <= per_class <= grid:
        raise ValueError(f"per_class must be in 1..{grid} (distinct photo conditions per class), got {per_class}")
    if combo < 0 or (combo and num_classes < 2):
        raise ValueError(f"combo={combo} needs combo >= 0 and at least 2 classes (got {num_classes})")
    if not 0.02 <= image_scale <= 1.0:
        raise ValueError(f"image_scale must be in [0.02, 1.0] (1.0 = real 976x1280 photos), got {image_scale}")


def generate_dataset(out_dir: str | Path, num_classes: int, per_class: int, combo: int, seed: int = 0,
                     zip_output: bool = False, image_scale: float = 0.25, workers: int = 0,
                     progress: bool = True, placeholder_images: bool = False) -> dict[str, Any]:
    """Write a synthetic AI Hub tree (single + combination photos, one label JSON per pill) under `out_dir`.

    `image_scale` shrinks the 976x1280 photos (0.25 -> 244x320); label width/height/bbox describe the
    written image. `workers` = 0 uses every usable core; 1 renders in this process. `placeholder_images` writes flat
    photos with the boxes on a grid instead of drawing pills (same layout and labels, for scale rehearsals; always
    in this process). Returns a summary dict.
    """
    _check_args(num_classes, per_class, combo, image_scale)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    classes = make_classes(num_classes, seed)
    jobs = list(_single_jobs(classes, per_class, seed))
    jobs += list(_combo_jobs(classes, combo, seed, len(jobs)))
    writer, index_written = _Writer(out_dir, zip_output), set()
    workers = workers or usable_cores()
    n_labels = 0
    try:
        made = (_placeholders(jobs, classes, image_scale) if placeholder_images
                else _rendered(jobs, classes, image_scale, workers))
        for job, png, labels in tqdm(made, total=len(jobs),
                                     desc="synth", unit="img", disable=not progress):
            _store(writer, classes, job, png, labels, index_written)
            n_labels += len(labels)
    finally:
        writer.close()
    summary = {"root": str(out_dir), "num_classes": num_classes, "classes": [c.code for c in classes],
               "single_images": num_classes * per_class, "combination_images": combo,
               "combinations": len({job.folder for job in jobs if len(job.classes) > 1}), "label_files": n_labels,
               "image_scale": image_scale, "zip": zip_output, "seed": seed, "placeholder_images": placeholder_images,
               "seconds": round(time.perf_counter() - start, 2)}
    LOGGER.info("synthetic data set: %d classes, %d single + %d combination photos in %.1fs under %s",
                num_classes, summary["single_images"], combo, summary["seconds"], out_dir)
    return summary


def _placeholders(jobs: list[PhotoJob], classes: list[DrugClass],
                  image_scale: float) -> Iterator[tuple[PhotoJob, bytes, list[bytes]]]:
    _init_worker(classes)
    return (_placeholder_job(job, image_scale) for job in jobs)


def _rendered(jobs: list[PhotoJob], classes: list[DrugClass], image_scale: float,
              workers: int) -> Iterator[tuple[PhotoJob, bytes, list[bytes]]]:
    if workers <= 1 or len(jobs) < 16:
        _init_worker(classes)
        yield from (_render_job(job, image_scale) for job in jobs)
        return
    yield from forked_imap(_RenderJob(image_scale), jobs, workers, chunksize=8, initializer=_init_worker,
                           initargs=(classes,))


class _RenderJob:
    """Picklable partial of _render_job (the pool needs a top-level callable)."""

    def __init__(self, image_scale: float) -> None:
        self.image_scale = image_scale

    def __call__(self, job: PhotoJob) -> tuple[PhotoJob, bytes, list[bytes]]:
        return _render_job(job, self.image_scale)
