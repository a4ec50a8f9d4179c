"""The pipeline's evidence step: the imprint is read only when the contenders' imprints differ (a stand-in reader,
so no OCR runs here); what the read does to the answer is pillsnap.infer.answer's, tested in test_infer_answer."""

from __future__ import annotations

import pytest
from PIL import Image

from pillsnap.infer.evidence import Evidence
from pillsnap.infer.imprint import ImprintRead
from pillsnap.infer.thresholds import AnswerThresholds

CLASS_MAP = {"K-000001": {"print_front": "BSP", "print_back": ""}, "K-000002": {"print_front": "DGTH"},
             "K-000003": {"print_front": "BSP"}}
CROP = Image.new("RGB", (32, 32))


class FakeReader:
    def __init__(self, text: str) -> None:
        self.text, self.calls = text, []

    def read(self, crop, candidates=()) -> ImprintRead:
        self.calls.append(list(candidates))
        return ImprintRead(self.text, 0.9, 0.0, 0.01, True, None, None)


def evidence(text: str, **kwargs) -> tuple[Evidence, FakeReader]:
    ev = Evidence(CLASS_MAP, read_imprints=True, **kwargs)
    ev._reader = FakeReader(text)
    return ev, ev._reader


def topk(*pairs: tuple[str, float]) -> list[dict]:
    return [{"mapping_code": c, "name": c, "probability": p} for c, p in pairs]


def test_the_contenders_imprints_are_given_to_the_reader():
    ev, reader = evidence("GTH")
    got = ev.read(CROP, topk(("K-000001", 0.55), ("K-000002", 0.40)))
    assert got.text == "GTH" and reader.calls == [["BSP", "DGTH"]]


def test_no_read_when_the_contenders_share_an_imprint_or_reading_is_off():
    ev, reader = evidence("BSP")
    assert ev.read(CROP, topk(("K-000001", 0.5), ("K-000003", 0.45))) is None and reader.calls == []
    off = Evidence(CLASS_MAP, read_imprints=False)
    assert off.read(CROP, topk(("K-000001", 0.5), ("K-000002", 0.45))) is None


def test_the_thresholds_decide_who_is_a_contender():
    ev, reader = evidence("GTH", thresholds=AnswerThresholds(read_min_probability=0.5))
    assert ev.read(CROP, topk(("K-000001", 0.55), ("K-000002", 0.40))) is None and reader.calls == []


def test_the_reader_stops_at_the_policys_conclusive_read():
    ev = Evidence(CLASS_MAP, read_imprints=True, thresholds=AnswerThresholds(conclusive_read=0.75))
    reader = ev.reader()
    if reader is not None:  # rapidocr installed: the settings carry the policy's threshold (nothing loads yet)
        assert reader.settings.stop_similarity == 0.75


def test_the_unknown_check_reads_every_pill_whose_top_drug_has_an_imprint_on_record():
    ev, reader = evidence("BSP", check_unknown=True)
    # the contenders share an imprint, yet the read is made: it is checked against every known drug
    assert ev.read(CROP, topk(("K-000001", 0.5), ("K-000003", 0.45))).text == "BSP" and len(reader.calls) == 1
    assert ev.read(CROP, topk(("K-000002", 0.99))).text == "BSP" and len(reader.calls) == 2  # one contender too
    plain = Evidence({"K-000009": {"print_front": "", "print_back": "마크"}}, read_imprints=True, check_unknown=True)
    plain._reader = FakeReader("XY")
    assert plain.read(CROP, topk(("K-000009", 0.9))) is None  # nothing on record to hold a read against


def test_the_pills_of_a_photo_are_read_side_by_side_and_answered_in_their_order():
    """A read is ~130 ms of ONNX Runtime and OpenCV, which release the GIL: a 4-pill photo's reads one after another
    made its answer 4 reads long. With 2 at once, two reads meet (a barrier that a reader alone would wait at until
    it breaks); the reads come back in the pills' order, a pill whose read cannot change its answer with none."""
    import threading

    ev, _ = evidence("", parallel=2)
    met = threading.Barrier(2, timeout=10)

    def read(crop, candidates):
        if crop.size[0] == 40:
            return None
        met.wait()  # raises BrokenBarrierError when the other read never comes
        return ImprintRead(f"{crop.size[0]}", 0.9, 0.0, 0.01, True, None, None)

    ev.read = read
    crops = [Image.new("RGB", (w, w)) for w in (30, 40, 50)]
    reads = ev.read_all(crops, [topk(("K-000001", 0.5))] * 3)
    assert [r and r.text for r in reads] == ["30", None, "50"]
    serial, _ = evidence("", parallel=1)
    serial.read = read
    met = threading.Barrier(2, timeout=0.5)
    with pytest.raises(threading.BrokenBarrierError):  # one at a time: the first read waits alone
        serial.read_all(crops, [topk(("K-000001", 0.5))] * 3)
