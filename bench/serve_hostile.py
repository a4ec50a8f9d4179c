"""Hostile load against `pillsnap serve` on 127.0.0.1, bounded in clients and time, each figure against a baseline
measured in the same run:

1. Idle: normal single-photo requests one at a time (p50) and /health (p99).
2. Hostile phase (--seconds): at once, --slow clients that trickle request headers a byte at a time, --batches
   clients that each send --batch-rounds max-size batches (max_batch_files photos of almost max_upload_mb), clients
   that send huge hints (multi-MB form fields), --leavers clients that send a photo and disconnect without reading,
   while one normal client keeps predicting and a prober keeps asking /health.
   Reported: /health p99, normal p50 against idle (goal <= 2x), the server's RSS peak over its idle RSS (goal
   <= +300 MB) and the peak of its temp files (goal <= 200 MB), every status answered, the 5xx that were not
   deliberate load shedding (goal 0), jobs dropped because their client left, slow-header connections the server
   closed.

The server is `pillsnap serve` in its own process with its own TMPDIR (so its spooled uploads can be measured);
without --exp a temporary experiment with untrained demo-sized models is built (bench/serve_latency.py's).

    .venv/bin/python bench/serve_hostile.py [--exp runs/demo/exp] [--seconds 20] [--batches 20]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import io
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from serve_latency import BOUNDARY, KEY, ServerProcess, multipart, pct, synthetic_photos, temp_experiment

SHED = {"upload_budget", "busy"}  # 503s the server answers on purpose, with Retry-After, to stay within its limits


class Tally:
    """Statuses seen, with the error code of each 5xx (thread-safe)."""

    def __init__(self) -> None:
        self.lock, self.counts, self.unexpected = threading.Lock(), collections.Counter(), []

    def add(self, who: str, status: int, body: bytes) -> None:
        code = ""
        if status >= 500:
            code = body.split(b'"error":"', 1)[-1].split(b'"', 1)[0].decode(errors="replace") if body else ""
            if status != 503 or code not in SHED:
                with self.lock:
                    self.unexpected.append((who, status, code or body[:80]))
        with self.lock:
            self.counts[f"{who} {status}{' ' + code if code else ''}"] += 1


def noise_png(target_bytes: int) -> bytes:
    """A real PNG of noise just under `target_bytes` (noise does not compress)."""
    side = int((target_bytes / 3.05) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def form(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> bytes:
    parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (fields or {}).items()]
    parts += [(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"p{i}.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n" for i, (name, data) in enumerate(files)]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def post(port: int, path: str, body: bytes) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    try:
        conn.request("POST", path, body, {"X-API-Key": KEY,
                                          "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.perf_counter() - start
    except (BrokenPipeError, ConnectionResetError):  # refused (503, 413) and closed before the body was all sent
        return 0, b"", time.perf_counter() - start
    finally:
        conn.close()


def get_health(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200, resp.status
    return time.perf_counter() - start


def normal_latencies(port: int, body: bytes, stop: threading.Event, count: int, tally: Tally | None) -> list[float]:
    out: list[float] = []
    while len(out) < count and not stop.is_set():
        status, data, elapsed = post(port, "/v1/predict", body)
        if tally is not None:
            tally.add("normal", status, data)
        if status == 200:
            out.append(elapsed)
    return out


def slow_headers(port: int, stop: threading.Event, closed: list[float], start: float) -> None:
    """Sends a request line and then one header byte every second, never the blank line that ends the headers."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        while not stop.wait(1.0):
            sock.sendall(b"a")
    except OSError:  # the server closed it: what should happen
        closed.append(time.perf_counter() - start)
        return
    sock.close()


def leaver(port: int, body: bytes) -> None:
    """Sends a whole request, then leaves without reading the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: multipart/form-"
                f"data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)


class Sampler(threading.Thread):
    """Peaks of the server's RSS and of the bytes in its temp files, every 50 ms. The files are found through the
    server's open descriptors: Python's TemporaryFile has no name on Linux (O_TMPFILE), so listing TMPDIR sees
    nothing."""

    def __init__(self, pid: int, tmpdir: Path) -> None:
        super().__init__(daemon=True)
        self.proc, self.tmpdir, self.stop = psutil.Process(pid), tmpdir, threading.Event()
        self.rss_peak = self.tmp_peak = 0

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.rss_peak = max(self.rss_peak, self.rss())
            self.tmp_peak = max(self.tmp_peak, self.temp_bytes())

    def temp_bytes(self) -> int:
        size, fds = 0, Path(f"/proc/{self.proc.pid}/fd")
        for fd in os.listdir(fds):
            with contextlib.suppress(OSError):  # closed meanwhile
                if os.readlink(fds / fd).startswith(str(self.tmpdir)):
                    size += os.stat(fds / fd).st_size
        return size


def metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def hostile_phase(server: ServerProcess, args: argparse.Namespace, normal: bytes, batch: bytes, hint: bytes,
                  tally: Tally) -> dict:
    port, stop, start = server.port, threading.Event(), time.perf_counter()
    closed: list[float] = []
    threads = [threading.Thread(target=slow_headers, args=(port, stop, closed, start)) for _ in range(args.slow)]

    def batch_client() -> None:
        for _ in range(args.batch_rounds):
            status, data, _ = post(port, "/v1/predict/batch", batch)
            tally.add("batch", status, data)
            if stop.wait(0.5):
                return

    def hint_client() -> None:
        while not stop.wait(0.2):
            status, data, _ = post(port, "/v1/predict", hint)
            tally.add("huge-hint", status, data)

    threads += [threading.Thread(target=batch_client) for _ in range(args.batches)]
    threads += [threading.Thread(target=hint_client) for _ in range(2)]
    threads += [threading.Thread(target=leaver, args=(port, normal)) for _ in range(args.leavers)]
    health: list[float] = []

    def prober() -> None:
        while not stop.wait(0.05):
            health.append(get_health(port))

    threads.append(threading.Thread(target=prober))
    for thread in threads:
        thread.start()
    busy: list[float] = []
    deadline = start + args.seconds
    while time.perf_counter() < deadline:
        busy += normal_latencies(port, normal, stop, 1, tally)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    return {"busy": busy, "health": health, "closed": closed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", type=Path, default=None, help="trained experiment (default: a temporary one)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the hostile phase")
    parser.add_argument("--slow", type=int, default=200, help="slow-header connections")
    parser.add_argument("--batches", type=int, default=20, help="clients sending max-size batches")
    parser.add_argument("--batch-rounds", type=int, default=2, help="batches each of those clients sends")
    parser.add_argument("--leavers", type=int, default=12, help="clients that send a photo and leave")
    parser.add_argument("--idle", type=int, default=30, help="normal requests and /health probes when idle")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the server's runtime")
    args = parser.parse_args()
    exp_dir = args.exp or temp_experiment()
    normal = multipart(synthetic_photos()[1], "auto")
    big = noise_png(int(10 * 2**20 * 0.97))
    batch = form([("files", big)] * 8)
    hint = form([("file", synthetic_photos()[0])], {"imprint": "A" * (3 * 2**20)})
    spool = Path(tempfile.mkdtemp(prefix="serve_hostile_tmp_"))
    server = ServerProcess(exp_dir, Path(tempfile.gettempdir()) / "serve_hostile_server.log", args.threads)
    old_tmp, os.environ["TMPDIR"] = os.environ.get("TMPDIR"), str(spool)  # the server inherits it
    try:
        server.__enter__()
    finally:
        os.environ.pop("TMPDIR") if old_tmp is None else os.environ.__setitem__("TMPDIR", old_tmp)
    try:
        report(server, args, normal, batch, hint, spool)
    finally:
        server.__exit__(None, None, None)


def report(server: ServerProcess, args: argparse.Namespace, normal: bytes, batch: bytes, hint: bytes,
           spool: Path) -> None:
    tally, never = Tally(), threading.Event()
    normal_latencies(server.port, normal, never, 3, None)  # warm-up
    idle = normal_latencies(server.port, normal, never, args.idle, tally)
    idle_health = [get_health(server.port) for _ in range(args.idle)]
    sampler = Sampler(server.proc.pid, spool)
    rss_idle = sampler.rss()
    sampler.start()
    out = hostile_phase(server, args, normal, batch, hint, tally)
    sampler.stop.set()
    sampler.join()
    cancelled = metric(server.port, "pillsnap_inference_cancelled_total")
    refusals = metric(server.port, "pillsnap_upload_budget_refusals_total")
    print(f"hostile phase: {args.seconds:g} s; {args.slow} slow-header connections, {args.batches} clients x "
          f"{args.batch_rounds} batches of 8 x {len(batch) / 8 / 2**20:.1f} MiB ({len(batch) / 2**20:.0f} MiB each), "
          f"2 huge-hint clients (3 MiB imprint), {args.leavers} leavers, 1 normal client, 1 /health prober")
    print(f"1. /health p99: idle {pct(idle_health, 99):.1f} ms | hostile {pct(out['health'], 99):.1f} ms "
          f"({len(out['health'])} probes)")
    print(f"2. normal /v1/predict p50: idle {pct(idle, 50):.1f} ms | hostile {pct(out['busy'], 50):.1f} ms "
          f"({len(out['busy'])} requests) = {pct(out['busy'], 50) / pct(idle, 50):.2f}x (goal <= 2x)")
    print(f"3. server RSS: idle {rss_idle / 2**20:.0f} MiB, peak {sampler.rss_peak / 2**20:.0f} MiB = "
          f"+{(sampler.rss_peak - rss_idle) / 1e6:.0f} MB (goal <= +300 MB) | temp files peak "
          f"{sampler.tmp_peak / 1e6:.0f} MB (goal <= 200 MB)")
    print(f"4. 5xx other than deliberate 503 shedding: {len(tally.unexpected)} (goal 0) {tally.unexpected[:5]}; "
          f"upload-budget refusals {refusals:.0f}")
    print(f"5. jobs dropped because their client left: {cancelled:.0f} of {args.leavers} leavers")
    closed = out["closed"]
    print(f"6. slow-header connections closed by the server: {len(closed)} of {args.slow}"
          + (f", after {min(closed):.1f}-{max(closed):.1f} s" if closed else ""))
    print("statuses (0: closed by the server while the client was still sending, after an early refusal):",
          dict(sorted(tally.counts.items())))


if __name__ == "__main__":
    main()
