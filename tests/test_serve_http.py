"""A real uvicorn server on loopback, driven over raw sockets where TestClient cannot show the behaviour: a chunked
upload with no key is refused before any of its body is sent, an oversized chunked upload is cut off on the
stream, a stalled upload times out, and /health answers while 8 predictions are in flight."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from collections.abc import Iterator

import pytest
import uvicorn
from test_serve_api import FakePredictor, make_app, png_bytes

MULTIPART = "multipart/form-data; boundary=xyz"


class Server:
    """uvicorn in a thread on 127.0.0.1, an ephemeral port; `options` go to uvicorn.Config."""

    def __init__(self, app, **options) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        started = threading.Event()
        for _ in range(400):
            if self.server.started:
                break
            started.wait(0.05)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        return sock


def request_head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # the server closed on an unread body after answering
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body.decode())


@pytest.fixture
def fake() -> FakePredictor:
    return FakePredictor()


@pytest.fixture
def server(fake) -> Iterator[Server]:
    with Server(make_app(fake, max_upload_mb=0.05, upload_timeout_s=1.0)) as running:
        yield running


def test_chunked_upload_without_key_is_refused_before_its_body(server, fake) -> None:
    with server.connect() as sock:
        sock.sendall(request_head("/v1/predict", {"Transfer-Encoding": "chunked", "Content-Type": MULTIPART}))
        status, body = read_response(sock)  # not one body byte has been sent
    assert status == 401 and body["error"] == "unauthorized" and fake.seen == []


def test_oversized_chunked_upload_is_cut_off_on_the_stream(server, fake) -> None:
    chunk = b"%x\r\n%s\r\n" % (65536, b"0" * 65536)
    sent, answered = 0, False
    with server.connect() as sock:
        part = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        sock.sendall(request_head("/v1/predict", {"X-API-Key": "k", "Transfer-Encoding": "chunked",
                                                  "Content-Type": MULTIPART}) + b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 200 * 2**20 and not answered:  # a 200 MB upload, if nobody stops it
                sock.sendall(chunk)
                sent += 65536
                answered = bool(select.select([sock], [], [], 0)[0])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection after answering
        status, body = read_response(sock)
    assert status == 413 and body["error"] == "too_large" and fake.seen == []
    assert sent < 200 * 2**20  # the server answered long before the 200 MB were sent


def test_stalled_upload_times_out_with_408(server) -> None:
    with server.connect() as sock:
        sock.sendall(request_head("/v1/predict", {"X-API-Key": "k", "Content-Length": "5000",
                                                  "Content-Type": MULTIPART}) + b"--xyz\r\n")
        status, body = read_response(sock)  # then nothing more is sent
    assert status == 408 and body["error"] == "upload_timeout" and "serving.upload_timeout_s" in body["detail"]


def _predict(port: int, results: list) -> None:
    boundary = "xyz"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png_bytes() + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/predict", body, {"X-API-Key": "k", "Content-Type": MULTIPART})
    results.append(conn.getresponse().status)
    conn.close()


def test_health_answers_while_8_predictions_are_in_flight() -> None:
    gate = threading.Event()
    app = make_app(FakePredictor(gate=gate), workers=2, max_queue=8)
    runner, results = app.state.pillsnap.runner, []
    with Server(app) as running:
        threads = [threading.Thread(target=_predict, args=(running.port, results)) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            waiter = threading.Event()
            for _ in range(600):
                if runner.jobs == 8:
                    break
                waiter.wait(0.05)
            assert runner.jobs == 8
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            gate.set()
            for thread in threads:
                thread.join(timeout=60)
    assert results == [200] * 8
