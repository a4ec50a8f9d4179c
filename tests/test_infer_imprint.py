"""The imprint reader (pillsnap/infer/imprint.py): its geometry and search on drawn crops with a stand-in OCR, and
the real OCR on rotated synthetic pills (slow)."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pillsnap.infer.imprint import ImprintRead, ImprintReader, pick_candidate
from pillsnap.infer.imprint_geometry import central_band, principal_axis, text_lines, turn
from pillsnap.infer.ocr import LineRead, RapidOcrModels, ctc_log_likelihoods, get_models
from pillsnap.infer.preprocess import locate_pill, pill_mask

BACKDROP, PILL, INK, MARK = (90, 100, 140), (240, 238, 230), (40, 40, 40), (230, 30, 30)


def _pill_crop(angle: float, size: int = 240) -> Image.Image:
    """An oval pill turned `angle` degrees counter-clockwise, with a dark text bar along its long axis that
    starts (when upright) with a red mark: the stand-in OCR reads it only when the mark is on the left."""
    tile = Image.new("RGBA", (160, 80), (0, 0, 0, 0))
    draw = ImageDraw.Draw(tile)
    draw.ellipse((0, 0, 159, 79), fill=PILL)
    draw.rectangle((40, 32, 52, 47), fill=MARK)
    draw.rectangle((53, 32, 120, 47), fill=INK)
    crop = Image.new("RGB", (size, size), BACKDROP)
    turned = tile.rotate(angle, resample=Image.BICUBIC, expand=True)
    crop.paste(turned, ((size - turned.width) // 2, (size - turned.height) // 2), turned)
    return crop


class FakeModels:
    """Text map: the dark and red pixels. Recogniser: "AB12" for a wide line with the red mark in its left half,
    its upside-down garbage with the mark on the right, nothing for a tall one."""

    def __init__(self, score: float = 0.9) -> None:
        self.score, self.calls = score, 0

    @staticmethod
    def _red(bgr: np.ndarray) -> np.ndarray:
        return (bgr[..., 2] > 150) & (bgr[..., 1] < 90) & (bgr[..., 0] < 90)

    def text_map(self, bgr: np.ndarray) -> np.ndarray:
        dark = bgr.astype(int).sum(-1) < 200
        return (dark | self._red(bgr)).astype(np.float32)

    def recognise(self, patches):
        self.calls += 1
        out = []
        for p in patches:
            xs = np.nonzero(self._red(p))[1]
            if p.shape[1] < 1.5 * p.shape[0] or not len(xs):
                out.append(("", 0.0))
            else:
                out.append(("AB12", self.score) if xs.mean() < p.shape[1] / 2 else ("ZIBV", 0.6))
        return out


@pytest.mark.parametrize("angle", [0, 35, 90, 150, 220, 300])
def test_principal_axis_of_a_turned_pill(angle):
    rgb = np.asarray(_pill_crop(angle))
    axis, elongation = principal_axis(pill_mask(rgb))
    assert abs((axis - angle + 90) % 180 - 90) < 3 and elongation > 1.7


def test_pill_mask_finds_the_pill_not_the_backdrop():
    mask = pill_mask(np.asarray(_pill_crop(20)))
    area = math.pi * 80 * 40
    assert abs(mask.sum() - area) / area < 0.1 and not mask[:5].any()


def lamp_falloff(image: Image.Image, levels: float) -> np.ndarray:
    """The backdrop darkened by up to `levels` from left to right, as a lamp to one side lights it."""
    rgb = np.asarray(image).astype(np.float32)
    backdrop = (rgb == np.asarray(BACKDROP, np.float32)).all(-1, keepdims=True)
    ramp = np.linspace(0.0, levels, rgb.shape[1], dtype=np.float32)[None, :, None]
    return np.where(backdrop, rgb - ramp, rgb).clip(0, 255).astype(np.uint8)


def test_one_segmentation_for_crops_and_photos_follows_the_lamps_falloff():
    """The reader's crops and single mode's whole photos go through the same pill_mask. On a photo, where the
    pill is small, a backdrop that darkens by 40 levels across (a lamp's falloff) is not a pill: measured from one
    flat backdrop colour its far side would be, and the located box would stretch across the photo."""
    photo = Image.new("RGB", (640, 480), BACKDROP)
    photo.paste(_pill_crop(0, size=200), (220, 140))  # the crop's own backdrop is the photo's
    lit = lamp_falloff(photo, 40.0)
    area = math.pi * 80 * 40
    assert abs(pill_mask(lit).sum() - area) / area < 0.1
    x, y, w, h = locate_pill(Image.fromarray(lit))
    assert abs(w - 160) < 12 and abs(h - 80) < 12 and abs(x + w / 2 - 320) < 8
    crop = pill_mask(lamp_falloff(_pill_crop(20), 40.0))  # and on a crop: the darkened side is no pill either
    assert not crop[:, -30:].any() and not crop[:, :30].any() and abs(crop.sum() - area) / area < 0.15


def test_text_lines_top_to_bottom_and_joined_across_thin_gaps():
    text = np.zeros((100, 200), dtype=bool)
    text[20:30, 40:160] = True
    text[31:33, 40:160] = True  # the same line, split by one empty row
    text[60:70, 60:120] = True
    lines = text_lines(text, unclip=0.0)
    assert lines == [(40, 20, 160, 33), (60, 60, 120, 70)]
    assert text_lines(text, max_lines=1, unclip=0.0) == [(40, 20, 160, 33)]  # the largest
    grown = text_lines(text)[0]
    assert grown[0] < 40 and grown[1] < 20 and grown[3] > 33


def test_turn_and_central_band():
    image = np.zeros((40, 100, 3), dtype=np.uint8)
    assert turn(image, 90).shape == (100, 40, 3)
    pill = pill_mask(np.asarray(_pill_crop(0)))
    band = central_band(pill, 0.0)
    assert band.any() and (band & ~pill).sum() < 0.05 * band.sum()


@pytest.mark.parametrize("angle", [0, 35, 90, 150, 220, 300])
def test_reader_turns_the_text_upright_at_any_angle(angle):
    models = FakeModels()
    read = ImprintReader(models=models).read(_pill_crop(angle))
    assert read.text == "AB12" and read.text_found and read.score == pytest.approx(0.9)
    assert abs((read.angle + angle + 180) % 360 - 180) < 5  # turned back by the pill's own angle
    assert models.calls == 2  # 0.9 < stop_score: the cross turns were tried too


def test_a_candidate_match_ends_the_search_early():
    models = FakeModels()
    read = ImprintReader(models=models).read(_pill_crop(35), candidates=["마크 AB12", "XY9"])
    assert (read.matched, read.similarity, models.calls) == ("AB12", 1.0, 1)
    assert read.to_dict()["normalized"] == "AB12" and read.seconds >= 0


def test_nothing_to_read():
    crop = Image.new("RGB", (120, 120), BACKDROP)
    ImageDraw.Draw(crop).ellipse((20, 40, 100, 80), fill=PILL)
    read = ImprintReader(models=FakeModels()).read(crop)
    assert read == ImprintRead("", 0.0, read.angle, read.seconds, False)


def test_importing_the_modules_loads_no_ocr_and_no_torch():
    code = ("import sys, pillsnap.infer.imprint, pillsnap.infer.imprint_geometry, pillsnap.infer.ocr, "
            "pillsnap.infer.matching; "
            "print([m for m in ('rapidocr_onnxruntime', 'onnxruntime', 'cv2', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_ocr_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    with pytest.raises(ImportError, match="pip install rapidocr-onnxruntime"):
        get_models(threads=97)  # a setting no other test loads, so nothing is cached


# ---- the real OCR on synthetic pills --------------------------------------------------------------------------

def _twin_pairs(n_pairs: int):
    """Look-alike twins of the generator (same shape, colours and size; only the imprints differ)."""
    from pillsnap.data.synth import make_classes

    classes = make_classes(40, seed=0)
    pairs = []
    for a, b in zip(classes, classes[1:], strict=False):
        same = all(getattr(a.look, k) == getattr(b.look, k) for k in ("shape", "colors", "rgb", "long_mm"))
        if same and a.look.print_front and b.look.print_front:
            pairs.append((a, b))
    assert len(pairs) >= n_pairs, "the generator made fewer look-alike twins than this test needs"
    return pairs[:n_pairs]


def _rendered_crop(look, camera_lo: int, scale: float) -> Image.Image:
    from pillsnap.data.synth_render import PhotoConditions, render_photo
    from pillsnap.infer.preprocess import crop_pill

    cond = PhotoConditions("0", "2", "1", 90, camera_lo)
    png, boxes, _ = render_photo([look], cond, scale, seed=camera_lo)
    return crop_pill(Image.open(io.BytesIO(png)).convert("RGB"), boxes[0], 0.15)


@pytest.mark.slow
def test_ocr_tells_look_alike_twins_apart_at_any_angle():
    """4 twin pairs x 2 pills x 2 azimuths = 16 rotated crops at half the real photo size (the demo's quarter
    scale reads worse; see bench/bench_imprint.py). Measured here: 16 of 16 told apart, and 12 of the 16
    classifier errors fixed; on 64 crops (8 pairs x 4 azimuths) 63 and 53 (83 %). The bars: 12 of 16 has a 4 %
    chance under guessing (1 in 2); without a read, rerank fixes none."""
    from pillsnap.infer.matching import class_imprint_similarity
    from pillsnap.infer.ranking import rerank

    pytest.importorskip("rapidocr_onnxruntime")  # not installed on Python 3.13+ (no wheel)
    reader = ImprintReader()
    right = fixed = 0
    for a, b in _twin_pairs(4):
        class_map = {c.code: {"print_front": c.look.print_front, "print_back": c.look.print_back} for c in (a, b)}
        imprints = [t for e in class_map.values() for t in e.values() if t]
        for truth, other in ((a, b), (b, a)):
            for camera_lo in (40, 220):
                read = reader.read(_rendered_crop(truth.look, camera_lo + 17 * (truth is b), 0.5), imprints)
                sims = [class_imprint_similarity(read.text, class_map[c.code]) for c in (truth, other)]
                right += sims[0] > sims[1]
                # the classifier is fooled by the twin (0.6 against 0.4): does the read put it right?
                cands = [{"mapping_code": other.code, "probability": 0.6},
                         {"mapping_code": truth.code, "probability": 0.4}]
                top = rerank(cands, class_map, read=read.text, read_score=read.score).candidates[0]
                fixed += top["mapping_code"] == truth.code
    assert right >= 12, f"{right}/16 twins told apart"
    assert fixed >= 10, f"{fixed}/16 classifier errors fixed by the read"


# ---- the candidates' likelihoods ------------------------------------------------------------------------------

def _brute_force(probs: np.ndarray, label: list[int]) -> float:
    """P(label) under CTC by listing every path: repeats merged, then blanks (0) dropped."""
    import itertools

    total = 0.0
    for path in itertools.product(range(probs.shape[1]), repeat=len(probs)):
        merged = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
        if [c for c in merged if c] == label:
            total += float(np.prod([probs[t, c] for t, c in enumerate(path)]))
    return math.log(total) if total else -math.inf


def test_ctc_likelihood_sums_every_alignment():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=5)  # 5 frames over blank + 3 characters
    labels = [[], [1], [1, 2], [1, 1], [3, 2, 1], [2, 2, 2]]
    got = ctc_log_likelihoods(probs, labels)
    assert got == pytest.approx([_brute_force(probs, label) for label in labels], abs=1e-4)
    # a character the recogniser does not know (index -1), or more than the frames can spell: impossible
    assert ctc_log_likelihoods(probs, [[1, -1], [1, 1, 1, 1, 1]]) == [-math.inf] * 2


def _vocabulary_models(chars: str) -> RapidOcrModels:
    """RapidOcrModels' likelihood methods over a small vocabulary (blank at 0, then `chars`), without its models."""
    models = object.__new__(RapidOcrModels)
    models._index = {c: i + 1 for i, c in enumerate(chars)}
    models._spaces = [i for c, i in models._index.items() if c.isspace()]
    models._forms_of = {}
    return models


def test_a_reading_counts_its_other_characters_as_any_other_character():
    """The recogniser's own reading is measured as an imprint: a character outside the imprint alphabet (a dot, a
    glyph read from a logo's strokes) counts as any such character, so a reading whose "something else" is split
    over several glyphs still says what it says; a reading of imprint characters alone is measured exactly."""
    chars = " AaB.司"
    models = _vocabulary_models(chars)
    probs = np.array([[0.1, 0.0, 0.8, 0.05, 0.0, 0.025, 0.025],   # A
                      [0.1, 0.0, 0.0, 0.0, 0.0, 0.45, 0.45],      # "." or "司": something else, split
                      [0.1, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0]])       # B
    exact = models.log_likelihoods([probs], ["AB", "A.B"])
    assert models.reading_log_likelihood([probs], "ab") == pytest.approx(exact[0])  # case as imprints compare
    pooled = np.stack([probs[:, 0], probs[:, 2] + probs[:, 3], probs[:, 4], probs[:, 5] + probs[:, 6]], 1)
    assert models.reading_log_likelihood([probs], "A.B") == pytest.approx(_brute_force(pooled, [1, 3, 2]), abs=1e-4)
    assert models.reading_log_likelihood([probs], "A司B") == models.reading_log_likelihood([probs], "A.B")
    assert models.reading_log_likelihood([probs], "A.B") > exact[1] + math.log(1.9)  # the glyphs' mass together
    # a run of other characters is one "something else" (CTC would need a blank between two of the same label),
    # and a full-width letter is the letter
    assert models.reading_log_likelihood([probs], "A司.B") == models.reading_log_likelihood([probs], "A.B")
    assert models.reading_log_likelihood([probs], "ＡB") == pytest.approx(exact[0])
    assert models.reading_log_likelihood([probs], "ß") == models.reading_log_likelihood([probs], ".")
    # others with blanks between them are spelled one each (one token would have to cover the blanks), and never
    # below the exact string; a circled 1 is a 1, its probability too
    models = _vocabulary_models("A.B①1")
    sure = 0.999
    path = [0, 1, 0, 2, 0, 2, 0, 3, 0]  # "A", ".", ".", "B" with a blank between each
    probs = np.full((len(path), 6), (1 - sure) / 5)
    probs[np.arange(len(path)), path] = sure
    spaced = models.reading_log_likelihood([probs], "A..B")
    assert spaced > -0.1 and spaced >= models.log_likelihoods([probs], ["A..B"])[0]
    circled = np.full((3, 6), 0.01)
    circled[[0, 1, 2], [1, 4, 0]] = 0.95  # "A", "①", blank
    assert models.reading_log_likelihood([circled], "A①") > models.log_likelihoods([circled], ["A1"])[0]


CHARS = {c: i + 1 for i, c in enumerate("AB12ZIBV9")}


class ProbModels(FakeModels):
    """FakeModels whose lines carry frame probabilities spelling their text (each character over two frames, a
    blank between), and the likelihoods CTC gives them."""

    def recognise(self, patches):
        out = []
        for text, score in super().recognise(patches):
            frames = [0] + [k for c in text for k in (CHARS[c], CHARS[c], 0)]
            probs = np.full((len(frames) + 4, max(CHARS.values()) + 1), 0.02)
            probs[np.arange(len(frames)), frames] = 0.8
            probs[len(frames):, 0] = 0.8
            out.append(LineRead(text, score, probs / probs.sum(1, keepdims=True)))
        return out

    def log_likelihoods(self, lines, texts):
        return ctc_log_likelihoods(np.concatenate(lines), [[CHARS.get(c, -1) for c in t] for t in texts])


def test_candidates_likelihoods_from_the_lines_read():
    read = ImprintReader(models=ProbModels()).read(_pill_crop(35), candidates=["마크 AB12", "AB", "ZIBV", "가나"])
    likelihoods = read.likelihoods
    # one value per imprint the recogniser can spell (the logo word dropped; Hangul it cannot spell: none)
    assert set(likelihoods) == {"AB12", "AB", "ZIBV"}
    # "AB" is spelled only by leaving out characters the frames show; each imprint counts at its own best turn, so
    # "ZIBV", what the stand-in reads upside down, is as likely as "AB12" (the pill's orientation is unknown)
    assert likelihoods["AB12"] == likelihoods["ZIBV"] > likelihoods["AB"] + 10
    assert read.read_likelihood == likelihoods["AB12"]  # what it reads itself is the candidate
    assert ImprintReader(models=ProbModels()).read(_pill_crop(35), ["XY9"]).read_likelihood == likelihoods["AB12"]
    assert ImprintReader(models=ProbModels()).read(_pill_crop(35)).likelihoods is None  # no candidates: none
    assert ImprintReader(models=FakeModels()).read(_pill_crop(35), ["AB12"]).likelihoods == {}  # no probabilities


def test_the_readers_own_reading_is_measured_as_an_imprint_where_the_recogniser_can():
    """read_likelihood comes from the recogniser's reading_log_likelihood when it has one (the pooled measure), the
    candidates' likelihoods from log_likelihoods either way."""
    seen = []

    class Pooling(ProbModels):
        def reading_log_likelihood(self, lines, text):
            seen.append(text)
            return -0.5

    plain = ImprintReader(models=ProbModels()).read(_pill_crop(35), candidates=["AB12", "ZIBV"])
    pooled = ImprintReader(models=Pooling()).read(_pill_crop(35), candidates=["AB12", "ZIBV"])
    assert pooled.read_likelihood == -0.5 and plain.read_likelihood != -0.5 and "AB12" in seen
    assert pooled.likelihoods == plain.likelihoods


def test_the_reader_picks_by_the_text_else_by_the_likelihoods():
    """The candidate a read fits: the text decides where it matches one; where it matches none, the strictly
    likeliest candidate on the lines; never by the likelihoods while a candidate could not be measured."""
    reader = ImprintReader(models=ProbModels())
    by_text = reader.read(_pill_crop(35), ["AB", "2B"])  # "AB12" is like "AB" as text (0.75)
    assert (by_text.matched, by_text.matched_by) == ("AB", "text")
    by_strokes = reader.read(_pill_crop(35), ["9", "A2"])  # like neither as text; no "9" in the strokes
    assert (by_strokes.matched, by_strokes.matched_by) == ("A2", "likelihood")
    assert by_strokes.likelihoods["A2"] > by_strokes.likelihoods["9"]
    assert by_strokes.similarity == 0.5  # still the read text's similarity to what was picked
    # "Y" read from "I|Y": like none as text, likeliest "IY"; the text alone would have kept its own best fit, "5"
    likelihoods = {"IY": -2.7, "5": -5.1, "213": -14.1}
    assert pick_candidate("Y", "5", 0.3, likelihoods, ["I|Y", "5", "*213"]) == ("IY", 0.5, "likelihood")
    # a good text match stands, whatever the likelihoods say
    assert pick_candidate("IY", "I|Y", 1.0, {"IY": -9.0, "5": -1.0}, ["I|Y", "5"]) == ("IY", 1.0, "text")
    # an unspellable candidate (Hangul) might be the truth: the text's own best fit, however weak
    assert pick_candidate("Y", "5", 0.3, likelihoods, ["I|Y", "5", "가나"]) == ("5", 0.3, "text")
    # a tie says nothing, and -inf counts as not measured
    assert pick_candidate("Y", "5", 0.3, {"IY": -3.0, "5": -3.0}, ["I|Y", "5"])[2] == "text"
    assert pick_candidate("", None, None, {"IY": -3.0, "5": -math.inf}, ["I|Y", "5"]) == (None, None, None)
    assert pick_candidate("", None, None, {"IY": -3.0, "5": -9.0}, ["I|Y", "5"]) == ("IY", None, "likelihood")
    # a logo-only side has nothing the recogniser can measure, and could be the truth, like a Hangul imprint
    assert pick_candidate("", None, None, {"IY": -3.0, "5": -9.0}, ["I|Y", "5", "*"]) == (None, None, None)
    # a likelihood for something that is not a candidate is no reason to pick it, or anything
    assert pick_candidate("", None, None, {"ZZ": -1.0, "IY": -3.0, "5": -4.0}, ["I|Y", "5"])[0] == "IY"
    assert pick_candidate("Y", None, None, {"IY": -1.0}, []) == (None, None, None)
    # two candidates alike once normalised ("*A1", a logo and A1, and "A1"): one imprint, its best similarity
    for order in (["*A1", "A1", "B7"], ["A1", "*A1", "B7"]):
        assert pick_candidate("XA", None, None, {"A1": -2.0, "B7": -5.0}, order) == ("A1", 0.35, "likelihood")


def test_lines_read_as_nothing_give_no_likelihoods():
    """On frames the recogniser reads as blank, a candidate's likelihood says only how few characters it has (a
    one-character imprint would beat every longer one): such lines are not evidence."""

    class Blank(ProbModels):  # finds the text bar, reads it as nothing at every turn
        @staticmethod
        def _red(bgr):
            return np.zeros(bgr.shape[:2], bool)

    read = ImprintReader(models=Blank()).read(_pill_crop(35), ["A", "AB12"])
    assert read.text == "" and read.likelihoods == {} and read.read_likelihood is None
    assert (read.matched, read.matched_by) == (None, None)


def _frames(models, spelled: str) -> np.ndarray:
    """Frame probabilities (the real recogniser's columns) putting 0.9 on each character of `spelled` in turn,
    a blank between, 0.1 spread over the rest."""
    index = models._index
    width = len(models._ocr.text_rec.postprocess_op.character)
    path = [0] + [k for c in spelled for k in (index[c], 0)]
    probs = np.full((len(path), width), 0.1 / (width - 1))
    probs[np.arange(len(path)), path] = 0.9
    return probs


@pytest.mark.parametrize("spelled", ["co", "ＣＯ", "C O", "C\u3000O"])
def test_a_characters_forms_count_as_one(spelled):
    """Lower case and full-width forms are the same imprint character, and a space is nothing between them."""
    pytest.importorskip("rapidocr_onnxruntime")
    models = get_models(threads=1)
    same, other = models.log_likelihoods([_frames(models, spelled)], ["CO", "C0"])
    assert same > -1.0 and other < same - 5


def test_recognise_reads_as_rapidocr_does():
    """RapidOcrModels.recognise (which keeps each line's frame probabilities) against RapidOCR's own recogniser on
    the same line images."""
    pytest.importorskip("rapidocr_onnxruntime")
    models = get_models(threads=1)
    lines = []
    for text, width in (("AB12", 160), ("TYLENOL", 300), ("5", 60)):
        line = Image.new("RGB", (width, 48), (235, 235, 230))
        ImageDraw.Draw(line).text((8, 8), text, fill=(30, 30, 30), font_size=30)
        lines.append(np.asarray(line)[:, :, ::-1].copy())
    ours = models.recognise(lines)
    theirs, _ = models._ocr.text_rec(lines)
    assert [(r.text, round(r.score, 4)) for r in ours] == [(t, round(float(c), 4)) for t, c, *_ in theirs]
    assert ours[0].text == "AB12" and all(r.probs.shape[1] == len(models._index) + 1 for r in ours)


def test_reads_at_the_same_time_each_lease_their_own_ocr_models_and_later_reads_reuse_them(monkeypatch):
    """Concurrent runs of one ONNX Runtime session take turns on its one thread pool: reads side by side each lease
    a set of models of their own, and the sets stay for later reads (as many as were ever in use at once), whatever
    thread reads next; a set per thread would load again for every new serving thread and never be freed."""
    import threading

    from pillsnap.infer import ocr

    made = []

    class Fake:
        def __init__(self, threads, rec_width):
            made.append(self)

    monkeypatch.setattr(ocr, "RapidOcrModels", Fake)
    met, seen = threading.Barrier(2, timeout=10), []

    def read():
        with ocr.lease_models(threads=91) as models:
            met.wait()  # both hold a set at once
            with ocr.lease_models(threads=91) as again:  # nested: the thread's own
                seen.append((models, again, ocr.get_models(threads=91)))

    workers = [threading.Thread(target=read) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(made) == 2 and seen[0][0] is not seen[1][0]
    assert all(models is again is inside for models, again, inside in seen)
    def read_later():
        with ocr.lease_models(threads=91) as models:
            seen.append(models)

    later = threading.Thread(target=read_later)
    later.start()
    later.join()
    assert len(made) == 2 and seen[-1] in made  # a new thread reuses a free set
    assert ocr.get_models(threads=91) in made and len(made) == 2  # outside a read: the first set, none loaded
