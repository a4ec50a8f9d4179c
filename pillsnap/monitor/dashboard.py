"""The live dashboard: a FastAPI app serving one page (HTML, CSS and JS shipped in this package, so it works
offline) and pushing the run's state over a WebSocket whenever the metrics stream grows (whole at first, then what
changed: pillsnap.monitor.delta), plus a system sample every few seconds (which doubles as the heartbeat behind the
page's "live" indicator)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from pillsnap.monitor.daemon import APP_NAME
from pillsnap.monitor.delta import diff
from pillsnap.monitor.live import LiveRun
from pillsnap.monitor.system import SystemProbe

LOGGER = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")


def dumps(message: dict) -> str:
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


def state_message(sent: dict | None, state: dict) -> str | None:
    """The message that brings a page holding `sent` (None: nothing yet) to `state`: the state whole ("state"), or
    what changed ("patch"); None when nothing did."""
    if sent is None:
        return dumps({"kind": "state", "data": state})
    patch = diff(sent, state)
    return None if patch is None else dumps({"kind": "patch", "data": patch})


async def push_updates(ws: WebSocket, live: LiveRun, probe: SystemProbe, poll_s: float, system_s: float) -> None:
    """Send the state whenever it changed (checked every `poll_s`), whole at first and then what changed, and a
    system sample every `system_s`. The sample is taken beside the state's updates, not between them: a GPU reading
    that hangs (NVML has no timeout) held the training's updates back for as long as it hung."""
    loop = asyncio.get_running_loop()
    sent_version, sent, next_system = None, None, 0.0
    sampling: asyncio.Future | None = None
    while True:
        if sampling is None and loop.time() >= next_system:
            sampling = asyncio.ensure_future(asyncio.to_thread(probe.sample))
        # file reads off the event loop; not waiting on another thread's read (the first of a multi-day stream
        # takes seconds, and the page said "no word from the server" meanwhile: the samples go on)
        version = await asyncio.to_thread(live.refresh, False)
        if version is not None and version != sent_version:
            state = await asyncio.to_thread(live.snapshot)
            message = await asyncio.to_thread(state_message, sent, state)
            if message is not None:
                await ws.send_text(message)
            sent_version, sent = version, state
        if sampling is not None and sampling.done():
            await ws.send_text(dumps({"kind": "system", "data": sampling.result()}))
            sampling, next_system = None, loop.time() + system_s
        await asyncio.sleep(poll_s)


async def until_closed(ws: WebSocket) -> None:
    """Returns when the page goes away (the page sends nothing else that matters)."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await ws.receive_text()


def create_dashboard(exp_dir: str | Path, poll_s: float = 1.0, system_s: float = 2.0) -> FastAPI:
    """Dashboard app following {exp_dir}/reports/metrics.jsonl (which need not exist yet)."""
    live = LiveRun(exp_dir)
    # the stream read once now, not when the first page asks: after days unwatched, 250 MB of records took the
    # first visitor 10 s
    threading.Thread(target=live.refresh, name="pillsnap-monitor-load", daemon=True).start()
    probe = SystemProbe(exp_dir)
    app = FastAPI(title="PillSnap monitor", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/api/health")
    def health() -> dict:
        return {"app": APP_NAME, "exp": str(Path(exp_dir).resolve())}

    @app.get("/api/state")
    def state() -> dict:
        live.refresh()
        return live.snapshot()

    @app.get("/api/system")
    def system() -> dict:
        return probe.sample()

    @app.websocket("/ws")
    async def updates(ws: WebSocket) -> None:
        await ws.accept()
        sender = asyncio.create_task(push_updates(ws, live, probe, poll_s, system_s))
        closed = asyncio.create_task(until_closed(ws))
        done, pending = await asyncio.wait({sender, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if sender in done and not isinstance(sender.exception(), WebSocketDisconnect | type(None)):
            LOGGER.error("dashboard update stream failed", exc_info=sender.exception())

    return app
