"""The web page in a real headless Chromium (Debian's, driven by playwright): upload a photo with the API key,
see the drug names and the boxes appear; the hint fields reach the server; unknown pills, confidences and the
hard-case note read right. Skipped where Chromium or playwright is missing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_infer_pipeline import CODES, make_exp_dir, pill_photo
from test_serve_http import Server

from pillsnap.config import load_config
from pillsnap.data.aihub import COLORS, SHAPES
from pillsnap.serve.app import create_app
from pillsnap.serve.cli import build_service

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HUNDRED = re.compile(r"100\.0\s*%")
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    exp_dir = make_exp_dir(tmp_path_factory.mktemp("exp"))
    cfg = load_config("config.yaml", [f"paths.exp_dir={exp_dir}", "inference.hard_cases.enabled=false"],
                      dotenv_path=None)
    service = build_service(exp_dir, cfg, "cpu")
    service.setup()
    with Server(create_app(service, api_key="page-key")) as running:
        yield running


@pytest.fixture()
def page(server, tmp_path: Path):
    """The page, opened with the API key typed in; fails the test on a script error or a failed request (nothing
    the page needs comes from elsewhere)."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1200, "height": 760})
        try:
            tab = browser.new_page()
            failed: list[str] = []
            tab.on("requestfailed", lambda request: failed.append(request.url))
            tab.on("pageerror", lambda error: failed.append(str(error)))
            tab.goto(f"http://127.0.0.1:{server.port}/")
            assert tab.locator("#keybox").is_visible()  # the server wants a key, so the page asks for one
            tab.fill("#key", "page-key")
            yield tab
            assert failed == []
        finally:
            browser.close()
            shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_upload_shows_drug_names_and_boxes(page, tmp_path: Path) -> None:
    photo = pill_photo(tmp_path / "pills.png", [(45, 60, 30, 24)])
    page.click("text=single pill")
    with page.expect_response("**/v1/predict", timeout=60_000) as answer:
        page.set_input_files("#file", str(photo))
    page.wait_for_selector(".pill .name", timeout=30_000)
    names = page.locator(".pill .name").all_inner_texts()
    assert names and all(name.startswith("drug ") for name in names)
    assert page.locator("#boxes rect").count() == len(names)
    assert "mode single" in page.locator(".summary").inner_text()
    assert not HUNDRED.search(page.locator("#results").inner_text())
    assert page.locator(".review").count() == (1 if answer.value.json()["hard_case"] else 0)
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_hint_fields_are_sent_with_the_photo(page, tmp_path: Path) -> None:
    options = "el => [...el.options].map(o => o.value).filter(Boolean)"
    assert page.eval_on_selector("#color", options) == list(COLORS)  # the label vocabulary, in its order
    assert page.eval_on_selector("#shape", options) == list(SHAPES)
    assert page.get_attribute("#imprint", "maxlength") == "32"
    page.fill("#imprint", "AB 12")
    page.select_option("#color", "하양")
    page.select_option("#color2", "노랑")
    page.select_option("#shape", "원형")
    sent: list[bytes] = []
    page.route("**/v1/predict", lambda route: (sent.append(route.request.post_data_buffer), route.continue_()))
    with page.expect_response("**/v1/predict", timeout=60_000) as answer:
        page.set_input_files("#file", str(pill_photo(tmp_path / "pill.png", [(45, 60, 30, 24)])))
    body = sent[0].decode("utf-8", "replace")
    for field, value in {"imprint": "AB 12", "color": "하양, 노랑", "shape": "원형"}.items():
        assert f'name="{field}"\r\n\r\n{value}\r\n' in body
    assert answer.value.status == 200  # the server took the page's words
    assert answer.value.json()["hints"] == {"imprint": "AB 12", "colors": ["하양", "노랑"], "shape": "원형"}
    page.locator("#imprint").blur()  # leaving a field unchanged asks nothing again ...
    page.wait_for_timeout(300)
    assert len(sent) == 1
    with page.expect_response("**/v1/predict", timeout=60_000):  # ... a changed one asks about the same photo
        page.select_option("#shape", "")
    assert len(sent) == 2 and 'name="shape"' not in sent[1].decode("utf-8", "replace")  # "any" sends nothing


def test_a_heic_photo_is_shown_through_the_server_and_answered(page, tmp_path: Path) -> None:
    """Chromium cannot show HEIC (iPhones' format): the page shows the server's JPEG of it, boxes on top."""
    from PIL import Image
    from test_utils_images import heic

    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(heic(Image.open(pill_photo(tmp_path / "pill.png", [(45, 60, 30, 24)]))))
    page.click("text=single pill")
    with page.expect_response("**/v1/preview", timeout=60_000) as shown, \
            page.expect_response("**/v1/predict", timeout=60_000) as answer:
        page.set_input_files("#file", str(photo))
    assert shown.value.status == 200 and answer.value.status == 200
    page.wait_for_selector(".pill .name", timeout=30_000)
    page.wait_for_function("() => document.getElementById('photo').naturalWidth > 0", timeout=30_000)
    width, height = answer.value.json()["image_size"]
    assert page.eval_on_selector("#photo", "img => [img.naturalWidth, img.naturalHeight]") == [width, height]
    assert page.locator("#boxes rect").count() == 1
    page.screenshot(path=str(tmp_path / "heic.png"))


def _pill(code: str | None, probability: float, bbox: list[int], unknown: bool = False) -> dict:
    order = sorted(CODES, key=lambda c: c != code)  # the answer first
    topk = [{"mapping_code": c, "name": f"drug {c[-1]}", "edi_codes": [], "probability": p}
            for c, p in zip(order, (probability, (1 - probability) * 0.7, (1 - probability) * 0.3), strict=True)]
    return {**topk[0], "mapping_code": code, "name": "" if unknown else topk[0]["name"], "bbox": bbox,
            "probability": None if unknown else probability, "det_confidence": 0.9, "topk": topk, "unknown": unknown,
            "unknown_reason": "top-1 probability 0.81 is below 0.90" if unknown else None,
            "unknown_by": "look" if unknown else None}


def _answer(pills: list[dict], hard_case: list[str]) -> dict:
    several = len(pills) > 1
    return {"request_id": "r", "filename": "p.png", "mode": "auto", "mode_used": "combo" if several else "single",
            "fallback_reason": "multi_object_hint" if several else None, "gating_score": 0.3,
            "single_confidence": 0.811, "num_detections": len(pills), "flags": [], "calibrated": True,
            "num_pills": len(pills), "image_size": [120, 160], "elapsed_ms": 12.0, "hard_case": hard_case,
            "pills": pills}


def _show(page, tmp_path: Path, answer: dict) -> str:
    """The page's rendering of a given answer (the server is not asked), as the results panel's text."""
    page.route("**/v1/predict", lambda route: route.fulfill(status=200, content_type="application/json",
                                                            body=json.dumps(answer)))
    page.set_input_files("#file", str(pill_photo(tmp_path / "photo.png", [(45, 60, 30, 24)])))
    page.wait_for_selector(".pill", timeout=30_000)
    return page.locator("#results").inner_text()


def test_unknown_pill_card_names_no_drug_and_no_probability(page, tmp_path: Path) -> None:
    text = _show(page, tmp_path, _answer([_pill(None, 0.811, [40, 55, 40, 34], unknown=True)], ["unknown_pill"]))
    card = page.locator(".pill.unknown")
    assert "Unknown pill — not one of the 3 known drugs" in card.inner_text()  # /version's class count
    assert all(f"drug {c[-1]}" in card.inner_text() for c in CODES)  # the nearest known drugs, by name
    assert "%" not in card.inner_text() and card.locator(".bar").count() == 0
    assert "81.1" not in text
    assert "does not look like any drug" in page.locator(".review").inner_text()  # a hard case: the note, in words
    assert card.locator(".why").inner_text() == "It looks unlike every known drug."


def test_an_unknown_pill_by_its_imprint_says_what_was_read(page, tmp_path: Path) -> None:
    pill = {**_pill(None, 0.9, [40, 55, 40, 34], unknown=True), "unknown_by": "imprint", "imprint_read": "D4F",
            "unknown_reason": "its imprint reads 'D4F' (confidence 0.94) and is like none of the imprints of the 3 "
                              "drugs it looks like: not one of them; nearest candidates in topk"}
    _show(page, tmp_path, _answer([pill], ["unknown_pill"]))
    why = page.locator(".pill.unknown .why").inner_text()
    assert why == "Its imprint reads “D4F”: none of the drugs it looks like carries it." and "%" not in why
    typed = {**_answer([{**pill, "det_confidence": None}], ["unknown_pill"]),
             "hints": {"imprint": "QQQ", "colors": [], "shape": None}}
    page.reload()
    _show(page, tmp_path, typed)  # a one-pill photo: the imprint typed in is what was held against the drugs
    assert page.locator(".pill.unknown .why").inner_text().startswith("You typed the imprint “QQQ”")


def test_a_box_that_may_hold_no_pill_says_so_and_names_no_drug(page, tmp_path: Path) -> None:
    rim = {**_pill(None, 0.92, [60, 30, 34, 26], unknown=True), "unknown_by": "box", "det_confidence": 0.35,
           "hints_conflict": True, "conflicts": ["color"],
           "unknown_reason": "the detector is less sure of this box (confidence 0.350) than it was of every one of "
                             "the 66 pills on the validation photos (bound 0.526, ...): it may hold no pill"}
    _show(page, tmp_path, _answer([_pill("K-000001", 0.99, [5, 10, 30, 24]), rim], ["maybe_no_pill"]))
    card = page.locator(".pill.unknown")
    assert card.locator(".name").inner_text() == "Maybe not a pill" and "dish's rim" in card.inner_text()
    assert "Unknown pill" not in card.inner_text() and "%" not in card.inner_text()
    assert "If it is a pill, the nearest known drugs" in card.inner_text() and "drug 1" in card.inner_text()
    assert "disagrees with your hint" not in card.inner_text()  # no drug is named, so nothing contradicts a hint
    assert "may hold no pill at all" in page.locator(".review").inner_text()
    assert "pills 1 + 1 maybe not" in page.locator("#results").inner_text()


def test_confidences_never_read_100_and_a_routine_combo_is_no_hard_case(page, tmp_path: Path) -> None:
    pills = [_pill("K-000001", 0.99996, [5, 10, 30, 24]), _pill("K-000002", 0.9994, [60, 30, 34, 26]),
             _pill("K-000003", 0.42, [30, 100, 40, 30])]
    pills[0]["topk"][0]["recalled_by_imprint"] = True  # ranked below the top-k, brought back by its imprint
    text = _show(page, tmp_path, _answer(pills, []))
    confidences = page.locator(".pill .confidence").all_inner_texts()
    assert confidences == ["confidence > 99.9\u00a0%", "confidence 99.9\u00a0%", "confidence 42.0\u00a0%"]
    page.click("text=3 candidates >> nth=0")
    assert "drug 1 (by its imprint)" in page.locator("#results").inner_text()
    assert not HUNDRED.search(page.locator("#results").inner_text()) and not HUNDRED.search(text)
    assert page.locator(".review").count() == 0  # several pills going to combo is routine, not a hard case
    page.screenshot(path=str(tmp_path / "combo.png"), full_page=True)


def test_prediction_sets_say_sure_or_name_every_drug_left_open(page, tmp_path: Path) -> None:
    sure, twins = _pill("K-000001", 0.9991, [5, 10, 30, 24]), _pill("K-000002", 0.58, [60, 30, 34, 26])
    sure.update(prediction_set=[{k: sure[k] for k in ("mapping_code", "name", "probability")}], set_coverage=0.95,
                sure=True, narrow_by=[])
    twins.update(prediction_set=[{k: c[k] for k in ("mapping_code", "name", "probability")} for c in twins["topk"][:2]],
                 set_coverage=0.95, sure=False, narrow_by=["other_side", "imprint"])
    _show(page, tmp_path, _answer([sure, twins], []))
    cards = page.locator(".pill").all_inner_texts()
    assert "Sure: the only drug left at 95 % confidence." in cards[0].replace("\u00a0", " ")
    assert "Not sure" not in cards[0]
    open_set = page.locator(".pill >> nth=1").locator(".set.open").inner_text()
    assert "one of 2 drugs" in open_set and "drug 2" in open_set and "drug 1" in open_set
    assert "photograph the other side of the pill, or type its imprint in the hint field" in open_set
    assert not HUNDRED.search(open_set)
    page.screenshot(path=str(tmp_path / "sets.png"), full_page=True)
