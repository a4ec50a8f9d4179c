"""Server-wide limits: the upload byte budget (503 + Retry-After, given back when a request ends), the header
deadline and the connection cap applied from the settings, and jobs dropped when their client has left."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_serve_api import FakePredictor, make_app, png_bytes
from test_serve_http import MULTIPART, Server, read_response, request_head

from pillsnap.config import ConfigError
from pillsnap.serve.limits import uvicorn_limits
from pillsnap.serve.settings import ServeSettings


def photo() -> dict:
    return {"file": ("a.png", png_bytes(), "image/png")}


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def multipart_body(count: int = 1) -> bytes:
    field = "files" if count > 1 else "file"
    parts = [(f'--xyz\r\nContent-Disposition: form-data; name="{field}"; filename="a{i}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n").encode() + png_bytes() + b"\r\n" for i in range(count)]
    return b"".join(parts) + b"--xyz--\r\n"


def test_upload_over_the_budget_gets_503_and_the_budget_is_given_back() -> None:
    app = make_app(max_upload_mb=0.05, max_inflight_upload_mb=1)
    budget = app.state.pillsnap.budget
    with TestClient(app) as client:
        assert client.post("/v1/predict", files=photo(), headers={"X-API-Key": "k"}).status_code == 200
        assert budget.held == 0  # given back once the answer is sent
        assert budget.take(budget.limit - 100)  # other uploads hold all but 100 bytes
        busy = client.post("/v1/predict", files=photo(), headers={"X-API-Key": "k"})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
        assert busy.json()["error"] == "upload_budget" and "serving.max_inflight_upload_mb" in busy.json()["detail"]
        budget.give_back(budget.limit - 100)
        assert client.post("/v1/predict", files=photo(), headers={"X-API-Key": "k"}).status_code == 200
        assert client.post("/v1/predict", files={"file": ("e.png", b"", "image/png")},
                           headers={"X-API-Key": "k"}).status_code == 400
        assert budget.held == 0  # also after a refused photo
        metrics = client.get("/metrics").text
    assert "pillsnap_upload_budget_refusals_total 1.0" in metrics


def test_chunked_upload_is_counted_against_the_budget_as_it_streams() -> None:
    app = make_app(max_upload_mb=0.05, max_inflight_upload_mb=1)
    budget = app.state.pillsnap.budget
    with Server(app) as server, server.connect() as sock:
        assert budget.take(budget.limit - 100)
        body = multipart_body()
        head = request_head("/v1/predict", {"X-API-Key": "k", "Transfer-Encoding": "chunked",
                                            "Content-Type": MULTIPART})
        sock.sendall(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, answer = read_response(sock)
        assert status == 503 and answer["error"] == "upload_budget"
        assert wait_for(lambda: budget.held == budget.limit - 100)  # the streamed bytes were given back


def test_budget_must_hold_one_full_batch() -> None:
    with pytest.raises(ConfigError, match="max_inflight_upload_mb"):
        ServeSettings(max_upload_mb=10, max_batch_files=8, max_inflight_upload_mb=50).check()
    ServeSettings().check()


def _post(port: int, body: bytes, path: str, statuses: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body, {"X-API-Key": "k", "Content-Type": MULTIPART})
    statuses.append(conn.getresponse().status)
    conn.close()


def _send_and_leave(port: int, body: bytes, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_head(path, {"X-API-Key": "k", "Content-Type": MULTIPART,
                                     "Content-Length": str(len(body))}) + body)
    return sock


def test_a_queued_job_whose_client_left_never_runs() -> None:
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    app = make_app(fake, workers=1, max_queue=4)
    runner, statuses = app.state.pillsnap.runner, []
    with Server(app) as server:
        first = threading.Thread(target=_post, args=(server.port, multipart_body(), "/v1/predict", statuses))
        first.start()
        assert wait_for(lambda: len(fake.seen) == 1)  # the only worker is busy with the first request
        leaver = _send_and_leave(server.port, multipart_body(), "/v1/predict")
        assert wait_for(lambda: runner.jobs == 2)
        leaver.close()
        time.sleep(0.3)  # the server notices the closed connection
        gate.set()
        first.join(timeout=30)
        assert wait_for(lambda: runner.jobs == 0)
        metrics = app.state.pillsnap.metrics.render()[0].decode()
    assert statuses == [200] and len(fake.seen) == 1
    assert 'pillsnap_inference_cancelled_total{endpoint="predict"} 1.0' in metrics


def test_a_batch_stops_at_the_next_photo_when_its_client_leaves() -> None:
    gate = threading.Event()
    fake = FakePredictor(gate=gate)
    app = make_app(fake, workers=1)
    with Server(app) as server:
        leaver = _send_and_leave(server.port, multipart_body(3), "/v1/predict/batch")
        assert wait_for(lambda: len(fake.seen) == 1)  # the first photo is in the model
        leaver.close()
        time.sleep(0.3)
        gate.set()
        assert wait_for(lambda: app.state.pillsnap.runner.jobs == 0)
        time.sleep(0.2)
    assert len(fake.seen) == 1  # photos 2 and 3 never ran


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_headers_must_arrive_within_header_timeout() -> None:
    settings = ServeSettings(header_timeout_s=0.5)
    with Server(make_app(), **uvicorn_limits(settings)) as server:
        with server.connect() as silent, server.connect() as trickle, server.connect() as kept:
            trickle.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"200 OK" in kept.recv(4096)
            time.sleep(0.3)
            kept.sendall(b"GET /health HTTP/1.1\r\n")  # the next request on a kept-alive connection, stalled
            assert _closed_within(silent, 3) and _closed_within(trickle, 3) and _closed_within(kept, 3)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/health")  # a prompt client is not affected
        assert conn.getresponse().status == 200


def test_connection_cap_refuses_new_requests_past_it() -> None:
    settings = ServeSettings(max_connections=2)
    with Server(make_app(), **uvicorn_limits(settings)) as server, server.connect(), server.connect():
        time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        conn.close()


def test_serve_applies_the_connection_settings(tmp_path, monkeypatch) -> None:
    import uvicorn

    import pillsnap.infer.artefacts
    import pillsnap.serve.cli
    from pillsnap.cli import main as cli_main
    from pillsnap.serve.service import PredictionService

    config = Path(__file__).resolve().parents[1] / "config.yaml"
    exp_dir = tmp_path / "exp"  # no models are loaded: uvicorn.run is replaced
    monkeypatch.setattr(pillsnap.infer.artefacts, "find_checkpoints", lambda exp: None)
    monkeypatch.setattr(pillsnap.serve.cli, "build_service",
                        lambda *a: PredictionService(FakePredictor, ServeSettings().image_limits))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PILLSNAP_API_KEY", "k")
    served: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append((app, kwargs)))
    assert cli_main(["serve", "--exp", str(exp_dir), "--cfg", str(config), "serving.max_connections=7",
                     "serving.keep_alive_s=3", "serving.header_timeout_s=4", "serving.max_inflight_upload_mb=200"]) == 0
    app, options = served[-1]
    assert options["limit_concurrency"] == 7 and options["timeout_keep_alive"] == 3
    assert options["http"].__name__ == "HeaderTimeoutProtocol"
    assert app.state.pillsnap.budget.limit == 200 * 2**20


def test_the_next_photo_of_an_admitted_batch_is_not_refused_for_a_queue_slot() -> None:
    import asyncio

    from pillsnap.serve.errors import ServerBusy
    from pillsnap.serve.runner import InferenceRunner

    async def scenario() -> list:
        runner, release = InferenceRunner(workers=1, max_queue=1), threading.Event()
        first = asyncio.create_task(runner.run(release.wait, 10))
        await asyncio.sleep(0.05)  # the one slot is taken
        with pytest.raises(ServerBusy):
            await runner.run(lambda: "new request")
        follow_on = asyncio.create_task(runner.run(lambda: "next photo", admitted=True))
        release.set()
        results = [await first, await follow_on]
        runner.shutdown()
        return results

    assert asyncio.run(scenario()) == [True, "next photo"]
