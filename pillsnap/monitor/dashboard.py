"""Live training dashboard: a FastAPI app serving one self-contained page (no CDN: works offline)
that polls /api/summary and draws loss curves and the latest metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from pillsnap.monitor.stream import MetricsFollower

PAGE_PATH = Path(__file__).with_name("dashboard.html")


def create_dashboard(exp_dir: str | Path) -> FastAPI:
    """Dashboard app following {exp_dir}/reports/metrics.jsonl."""
    follower = MetricsFollower(Path(exp_dir) / "reports" / "metrics.jsonl")
    app = FastAPI(title="PillSnap monitor")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE_PATH.read_text(encoding="utf-8")

    @app.get("/api/summary")
    def summary() -> dict:
        follower.poll()
        return follower.summary()

    return app
