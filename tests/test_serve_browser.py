"""The web page in a real headless Chromium (Debian's, driven by playwright): upload a photo with the API key,
see the drug names and the boxes appear. Skipped where Chromium or playwright is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_infer_pipeline import make_exp_dir, pill_photo
from test_serve_http import Server

from pillsnap.config import load_config
from pillsnap.serve.app import create_app
from pillsnap.serve.cli import build_service

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
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


def test_upload_shows_drug_names_and_boxes(server, tmp_path: Path) -> None:
    photo = pill_photo(tmp_path / "pills.png", [(45, 60, 30, 24)])
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1200, "height": 760})
        try:
            page = browser.new_page()
            failed: list[str] = []
            page.on("requestfailed", lambda request: failed.append(request.url))
            page.goto(f"http://127.0.0.1:{server.port}/")
            assert page.locator("#keybox").is_visible()  # the server wants a key, so the page asks for one
            page.fill("#key", "page-key")
            page.click("text=single pill")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector(".pill .name", timeout=60_000)
            names = page.locator(".pill .name").all_inner_texts()
            assert names and all(name.startswith("drug ") for name in names)
            assert page.locator("#boxes rect").count() == len(names)
            assert "mode single" in page.locator(".summary").inner_text()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert failed == []  # nothing the page needs comes from elsewhere
        finally:
            browser.close()
            shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
