"""Serving latency, in one run, each figure against a baseline measured in the same run:

1. API p50/p95 (`pillsnap serve` in its own process, HTTP over loopback, one request at a time) against calling
   the predictor directly in this process (decode + Predictor.predict, the same photos and mode).  Goal: p50 <= 1.25x.
2. /health p99 while 8 predictions are in flight (8 clients posting back to back), against /health idle.
   Goal: p99 < 50 ms.
3. The ONNX backend against torch eager on this CPU: photos per second through Predictor.predict, and the two
   models alone.  Goal: >= 1.3x.

Rounds alternate between the compared runs (the machine is shared). Every runtime gets the same --threads (torch
and onnxruntime in this process and in the server): on 2 shared cores, torch's OpenMP pool with 2 threads spends
most of its time waiting for a descheduled partner, which would measure the neighbours, not the runtimes.
Without --exp a temporary experiment with
untrained demo-sized models (resnet18 64 px, yolo11n 160 px) is built; with --exp (e.g. runs/demo/exp after
`pillsnap demo`) its checkpoints are served and exported to ONNX first if needed.

    .venv/bin/python bench/serve_latency.py [--exp runs/demo/exp] [--photos P ...] [--mode auto] [--rounds 4]
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pillsnap.config import load_config
from pillsnap.utils.images import decode_image

KEY = "bench-key"
BOUNDARY = "pillsnapbench"


def synthetic_photos() -> list[bytes]:
    """Demo-sized (244x320) photos: one pill, and three pills, on a plain backdrop."""
    out = []
    for pills in (((100, 140),), ((40, 60), (140, 80), (90, 220))):
        image = Image.new("RGB", (244, 320), (190, 190, 185))
        draw = ImageDraw.Draw(image)
        for x, y in pills:
            draw.ellipse((x, y, x + 48, y + 34), fill=(200, 40, 120))
        path = Path(tempfile.mkstemp(suffix=".png")[1])
        image.save(path)
        out.append(path.read_bytes())
    return out


def temp_experiment() -> Path:
    """Untrained demo-sized models in the checkpoint layout the predictor reads."""
    import torch

    from pillsnap.config import config_to_dict
    from pillsnap.models.classifier import build_classification_model
    from pillsnap.models.detector import build_yolo_model
    from pillsnap.utils import save_ckpt, save_json

    root = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    cfg = load_config("config.yaml", ["model.backbone=resnet18", "model.num_classes=8", "model.image_size=64",
                                      "model.detector=yolo11n", "model.det_image_size=160"], dotenv_path=None)
    torch.manual_seed(0)
    codes = [f"K-{i:06d}" for i in range(1, 9)]
    for name, model in (("classification_best.pt", build_classification_model("resnet18", 8)),
                        ("detection_best.pt", build_yolo_model("yolo11n", 1))):
        save_ckpt(root / "checkpoints" / name, {"model_state": model.state_dict(), "optimizer_state": {},
                                                "scheduler_state": {}, "scaler_state": {}, "epoch": 1,
                                                "best_metric": 0.0, "config_snapshot": config_to_dict(cfg)})
    save_json(root / "checkpoints" / "classes.json", {"class_names": codes, "class_map": {}})
    return root


def bench_cfg(exp_dir: Path, backend: str = "torch"):
    return load_config("config.yaml", [f"paths.exp_dir={exp_dir}", f"inference.backend={backend}",
                                       "inference.hard_cases.enabled=false"], dotenv_path=None)


def ensure_export(exp_dir: Path) -> None:
    from pillsnap.infer.export import export_experiment

    if not (exp_dir / "export" / "export.json").is_file():
        report = export_experiment(exp_dir, bench_cfg(exp_dir), samples=4)
        assert report["ok"], f"ONNX parity failed: {report['path']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`pillsnap serve` in a subprocess (its own interpreter and GIL, as in production)."""

    def __init__(self, exp_dir: Path, log_path: Path, threads: int) -> None:
        self.port, self.log_path, self.threads = free_port(), log_path, threads
        self.cmd = [sys.executable, "-m", "pillsnap.cli", "serve", "--exp", str(exp_dir), "--port", str(self.port),
                    "--device", "cpu", "inference.hard_cases.enabled=false", "serving.max_queue=64"]

    def __enter__(self) -> ServerProcess:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PILLSNAP_API_KEY": KEY, "OMP_NUM_THREADS": str(self.threads)})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if self.get("/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after 180 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)

    def get(self, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, float]:
        conn = conn or self.connection()
        start = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - start


def multipart(photo: bytes, mode: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"mode\"\r\n\r\n{mode}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + photo + f"\r\n--{BOUNDARY}--\r\n".encode()


def post_predict(conn: http.client.HTTPConnection, body: bytes) -> float:
    start = time.perf_counter()
    conn.request("POST", "/v1/predict", body, {"X-API-Key": KEY, "Content-Type": f"multipart/form-data; "
                                                                                  f"boundary={BOUNDARY}"})
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"/v1/predict answered {resp.status}")
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def api_vs_direct(server: ServerProcess, predictor, photos: list[bytes], mode: str, rounds: int, n: int) -> None:
    bodies = [multipart(p, mode) for p in photos]
    api, direct = [], []
    for body in bodies:  # warm-up both sides
        post_predict(server.connection(), body)
    for photo in photos:
        predictor.predict(decode_image(photo), mode=mode)
    for _ in range(rounds):
        conn = server.connection()  # a fresh keep-alive connection: the last one idled past uvicorn's 5 s
        for i in range(n):
            api.append(post_predict(conn, bodies[i % len(bodies)]))
        for i in range(n):
            start = time.perf_counter()
            predictor.predict(decode_image(photos[i % len(photos)]), mode=mode)
            direct.append(time.perf_counter() - start)
    print(f"1. API vs direct predictor ({mode}, {len(photos)} photos, {rounds} rounds x {n} requests, 1 at a time): "
          f"direct p50 {pct(direct, 50):.1f} ms p95 {pct(direct, 95):.1f} ms | API p50 {pct(api, 50):.1f} ms "
          f"p95 {pct(api, 95):.1f} ms | API/direct p50 = {pct(api, 50) / pct(direct, 50):.2f}x, "
          f"p95 = {pct(api, 95) / pct(direct, 95):.2f}x (goal p50 <= 1.25x)")


def health_latencies(server: ServerProcess, count: int) -> list[float]:
    conn = server.connection()
    out = []
    for _ in range(count):
        status, elapsed = server.get("/health", conn)
        assert status == 200
        out.append(elapsed)
        time.sleep(0.01)
    return out


def health_under_load(server: ServerProcess, photos: list[bytes], mode: str, count: int) -> None:
    idle = health_latencies(server, count)
    stop, done = threading.Event(), []

    def client(i: int) -> None:
        conn, body = server.connection(), multipart(photos[i % len(photos)], mode)
        while not stop.is_set():
            post_predict(conn, body)
            done.append(1)

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)  # let all 8 get in flight
    busy = health_latencies(server, count)
    stop.set()
    for thread in clients:
        thread.join(timeout=120)
    print(f"2. /health with 8 predictions in flight ({count} probes, {len(done)} predictions meanwhile): "
          f"p50 {pct(busy, 50):.1f} ms, p99 {pct(busy, 99):.1f} ms | idle p99 {pct(idle, 99):.1f} ms | "
          f"busy/idle p99 = {pct(busy, 99) / pct(idle, 99):.2f}x (goal p99 < 50 ms)")


def rate(fn, seconds: float) -> float:
    """Calls per second of fn over about `seconds`."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def onnx_vs_torch(exp_dir: Path, photos: list[bytes], mode: str, rounds: int, seconds: float) -> None:
    import torch

    from pillsnap.infer.pipeline import Predictor
    from pillsnap.infer.preprocess import letterbox

    images = [decode_image(p) for p in photos]
    predictors = {b: Predictor(exp_dir, bench_cfg(exp_dir, b), "cpu") for b in ("torch", "onnx")}
    for predictor in predictors.values():
        predictor.warm_up()
    size = predictors["torch"].transform(images[0]).shape[-1]
    crops = torch.randn(8, 3, size, size)
    boxed = letterbox(images[0], predictors["torch"].det_image_size)[0]
    runs = {"pipeline": lambda p: [p.predict(im, mode=mode) for im in images],
            "classifier (8 crops)": lambda p: p.classifier(crops),
            "detector (1 photo)": lambda p: p.detector(boxed)}
    rates: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for what, fn in runs.items():
                for backend, predictor in predictors.items():
                    per_call = len(images) if what == "pipeline" else 8 if what.startswith("classifier") else 1
                    rates.setdefault((what, backend), []).append(
                        rate(lambda f=fn, p=predictor: f(p), seconds) * per_call)
    for what in runs:
        t, o = (float(np.median(rates[(what, b)])) for b in ("torch", "onnx"))
        goal = " (goal >= 1.3x)" if what == "pipeline" else ""
        print(f"3. ONNX vs torch eager, {what}{f' ({mode})' if what == 'pipeline' else ''}: torch {t:.1f} img/s, "
              f"onnxruntime {o:.1f} img/s = {o / t:.2f}x{goal}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", type=Path, default=None, help="trained experiment (default: a temporary one)")
    parser.add_argument("--photos", nargs="*", default=None, help="photos to send (default: two synthetic ones)")
    parser.add_argument("--mode", default="auto", choices=("single", "combo", "auto"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="requests per round and side (figure 1)")
    parser.add_argument("--probes", type=int, default=200, help="/health requests idle and under load (figure 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per round and backend (figure 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    exp_dir = args.exp or temp_experiment()
    photos = [Path(p).read_bytes() for p in args.photos] if args.photos else synthetic_photos()
    ensure_export(exp_dir)
    print(f"experiment {exp_dir}, {len(photos)} photo(s), mode {args.mode}, {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s) per runtime", flush=True)
    from pillsnap.infer.pipeline import Predictor

    direct = Predictor(exp_dir, bench_cfg(exp_dir), "cpu")
    with ServerProcess(exp_dir, Path(tempfile.gettempdir()) / "serve_bench_server.log", args.threads) as server:
        api_vs_direct(server, direct, photos, args.mode, args.rounds, args.requests)
        health_under_load(server, photos, args.mode, args.probes)
    onnx_vs_torch(exp_dir, photos, args.mode, args.rounds, args.seconds)


if __name__ == "__main__":
    main()
