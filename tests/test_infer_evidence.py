"""The pipeline's evidence step: the imprint is read only when the contenders' imprints differ, and the read
re-ranks the candidates (a stand-in reader, so no OCR runs here)."""

from __future__ import annotations

from PIL import Image

from pillsnap.infer.evidence import Evidence
from pillsnap.infer.imprint import ImprintRead

CLASS_MAP = {"K-000001": {"print_front": "BSP", "print_back": ""}, "K-000002": {"print_front": "DGTH"},
             "K-000003": {"print_front": "BSP"}}


class FakeReader:
    def __init__(self, text: str) -> None:
        self.text, self.calls = text, []

    def read(self, crop, candidates=()) -> ImprintRead:
        self.calls.append(list(candidates))
        return ImprintRead(self.text, 0.9, 0.0, 0.01, True, None, None)


def evidence(text: str) -> tuple[Evidence, FakeReader]:
    ev = Evidence(CLASS_MAP, read_imprints=True)
    ev._reader = FakeReader(text)
    return ev, ev._reader


def topk(*pairs: tuple[str, float]) -> list[dict]:
    return [{"mapping_code": c, "name": c, "probability": p} for c, p in pairs]


def test_a_read_imprint_reorders_look_alike_twins():
    ev, reader = evidence("GTH")  # a near miss of DGTH, as OCR gives on real pills
    candidates, fields = ev.apply(Image.new("RGB", (32, 32)), topk(("K-000001", 0.55), ("K-000002", 0.40)), None)
    assert candidates[0]["mapping_code"] == "K-000002" and fields["ranking_changed"] is True
    assert fields["imprint_read"] == "GTH" and fields["imprint"]["score"] == 0.9
    assert reader.calls == [["BSP", "DGTH"]]


def test_no_read_when_the_contenders_share_an_imprint_or_reading_is_off():
    ev, reader = evidence("BSP")
    same = topk(("K-000001", 0.5), ("K-000003", 0.45))
    candidates, fields = ev.apply(Image.new("RGB", (32, 32)), same, None)
    assert reader.calls == [] and candidates == same and fields["imprint_read"] is None
    off = Evidence(CLASS_MAP, read_imprints=False)
    assert off.apply(Image.new("RGB", (32, 32)), topk(("K-000001", 0.5), ("K-000002", 0.45)), None)[1][
        "imprint_read"] is None


def test_an_unreadable_imprint_between_look_alikes_says_so_until_the_user_types_it():
    from pillsnap.infer.matching import Hints

    twins = topk(("K-000001", 0.55), ("K-000002", 0.40))
    ev, _ = evidence("")  # a plain side up: nothing to read
    candidates, fields = ev.apply(Image.new("RGB", (32, 32)), twins, None)
    assert fields["imprint_unresolved"] is True and candidates[0]["mapping_code"] == "K-000001"
    assert ev.apply(Image.new("RGB", (32, 32)), twins, Hints.parse(imprint="dgth"))[1]["imprint_unresolved"] is False
    ev, _ = evidence("GTH")  # read, and it matches one of them
    assert ev.apply(Image.new("RGB", (32, 32)), twins, None)[1]["imprint_unresolved"] is False
    assert Evidence(CLASS_MAP, read_imprints=False).apply(Image.new("RGB", (32, 32)), twins, None)[1][
        "imprint_unresolved"] is False  # not read at all: nothing is claimed about the imprint
