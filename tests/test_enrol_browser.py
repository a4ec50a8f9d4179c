"""The web page's enrolment form in headless Chromium: enrol a drug from five photos with the API key, see it
listed, then answered by name; a refused enrolment shows the server's reason. Skipped where Chromium or
playwright is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_enrol import NEW_CODE, NEW_COLOUR, calibrate, photos, pill
from test_infer_pipeline import _cfg, make_exp_dir
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS
from test_serve_http import Server

from pillsnap.infer.pipeline import Predictor
from pillsnap.serve.app import create_app
from pillsnap.serve.service import PredictionService
from pillsnap.utils.images import ImageLimits

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")]


@pytest.fixture()
def server(tmp_path: Path):
    exp_dir = make_exp_dir(tmp_path / "exp", with_detector=False)
    calibrate(exp_dir, tmp_path)
    service = PredictionService(lambda: Predictor(exp_dir, _cfg(exp_dir, "inference.imprint.enabled=false",
                                                                "inference.hard_cases.enabled=false"), device="cpu"),
                                ImageLimits(min_side=32))
    service.setup()
    with Server(create_app(service, api_key="page-key")) as running:
        yield running


def test_enrol_form_enrols_lists_and_the_drug_is_answered(server, tmp_path: Path) -> None:
    new = [str(p) for p in photos(tmp_path / "new", NEW_COLOUR, range(5))]
    probe = pill(tmp_path / "probe.png", NEW_COLOUR, 42, "rectangle")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=str(CHROMIUM),
                                                        args=CHROMIUM_ARGS, headless=True)
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.goto(f"http://127.0.0.1:{server.port}/")
            tab.fill("#key", "page-key")
            tab.click("#enrol summary")
            tab.fill("#enrolform input[name=code]", "K-000001")  # a trained class: refused, with the reason
            tab.fill("#enrolform input[name=name]", "새약 10mg")
            tab.fill("#enrolform input[name=color]", "yellow")
            tab.set_input_files("#enrolphotos", new)
            tab.click("#enrolform button")
            tab.wait_for_selector("#enrolnote .error", timeout=60_000)
            assert "K-000001 is a trained class" in tab.locator("#enrolnote").inner_text()
            tab.fill("#enrolform input[name=code]", NEW_CODE)
            tab.click("#enrolform button")
            tab.wait_for_selector("#enrolled li", timeout=60_000)
            assert f"Enrolled {NEW_CODE} 새약 10mg from 5 photos" in tab.locator("#enrolnote").inner_text()
            assert tab.locator("#enrolled li").inner_text().startswith(f"{NEW_CODE} 새약 10mg (5 photos)")
            tab.click("text=single pill")
            tab.set_input_files("#file", str(probe))
            tab.wait_for_selector(".pill .name", timeout=60_000)
            assert "새약 10mg" in tab.locator(".pill .name").first.inner_text()
            tab.click("#enrolled button")
            tab.wait_for_selector(f"#enrolnote >> text=removed {NEW_CODE}", timeout=30_000)
            assert errors == []
        finally:
            browser.close()
            shutil.rmtree(tmp_path / "profile", ignore_errors=True)
