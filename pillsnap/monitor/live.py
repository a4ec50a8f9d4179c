"""One followed run: the metrics stream and the stage evaluation file of an experiment, folded into a
MonitorState. Shared by the web dashboard and the terminal table."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from pillsnap.monitor.state import MonitorState, clean
from pillsnap.monitor.stream import StreamFollower
from pillsnap.utils.locks import RUN_LOCK, holder_alive, read_holder

LOGGER = logging.getLogger(__name__)
# What one evaluation decided: shown together, from one evaluation.
VERDICT_KEYS = frozenset({"status", "recommendation", "reason", "action", "rule", "reasons", "suggestions",
                          "not_comparable", "performance_score", "choice", "advisor", "go_no_go"})


def stream_path(exp_dir: str | Path) -> Path:
    return Path(exp_dir) / "reports" / "metrics.jsonl"


def evaluation_path(exp_dir: str | Path, stage: int | None) -> Path | None:
    """reports/stage_{stage}_evaluation.json; with no stage known (no start record, none in the run's saved
    config.yaml: config_stage), the newest such file."""
    reports = Path(exp_dir) / "reports"
    if stage is not None:
        return reports / f"stage_{stage}_evaluation.json"
    found = sorted(reports.glob("stage_*_evaluation.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def config_stage(exp_dir: str | Path) -> int | None:
    """The stage the run's saved config.yaml trains (data.progressive_validation.current_stage), None without one.
    A stream truncated or rotated has lost its start record: the newest evaluation file of any stage (an earlier
    stage's, in a folder reused) was shown as this run's verdict."""
    import yaml

    try:
        saved = yaml.safe_load((Path(exp_dir) / "config.yaml").read_text(encoding="utf-8"))
        return int(saved["data"]["progressive_validation"]["current_stage"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def trainer_process(exp_dir: str | Path) -> dict | None:
    """The training process that holds or last held the folder (its run.lock: pid, host, command) and whether it
    still holds it (None: on another host or in another container; no entry: the last holder was not a trainer).
    With a stream that says "running", one that let go or ended means the run stopped without a word (a kill, a
    crash); one holding means a quiet stretch (a long validation, a checkpoint)."""
    info = read_holder(Path(exp_dir) / RUN_LOCK)
    if info is None or info.get("role") != "train":  # `pillsnap evaluate` or `calibrate` holds, or held, it
        return None
    return {"pid": info["pid"], "host": info.get("host"), "command": info.get("command"),
            "since": info.get("since_unix"), "alive": holder_alive(info)}


class LiveRun:
    """Thread-safe: the web server refreshes from worker threads while pages read snapshots."""

    def __init__(self, exp_dir: str | Path, max_rows: int = 400) -> None:
        self.exp_dir = Path(exp_dir)
        self.follower = StreamFollower(stream_path(exp_dir))
        self.state = MonitorState(max_rows)
        self._lock = threading.Lock()
        self._file_eval: tuple[Path, float, dict] | None = None  # path, mtime, content of the evaluation file
        self._trainer: dict | None = None  # trainer_process as of the last refresh
        self._saved_stage: tuple[float, int | None] | None = None  # config.yaml's mtime and the stage it names

    def refresh(self, wait: bool = True) -> int | None:
        """Read what is new; returns the state's version (unchanged when nothing is). `wait` False: None at once
        while another thread reads (the first read of a multi-day stream takes seconds)."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            return self._refresh()
        finally:
            self._lock.release()

    def _refresh(self) -> int:
        chunk = self.follower.poll()
        self.state.apply_all(chunk.records, reset=chunk.reset)
        while chunk.more:  # a long stream, read in bounded bites: each applied before the next is read
            chunk = self.follower.poll()
            self.state.apply_all(chunk.records, reset=chunk.reset)
        if self._read_evaluation_file():
            self.state.version += 1
        trainer = trainer_process(self.exp_dir)
        if trainer != self._trainer:  # its process ended (or another took the folder): a new state to push
            self._trainer = trainer
            self.state.version += 1
        return self.state.version

    def snapshot(self) -> dict:
        """The state as of the last refresh."""
        with self._lock:
            snap = self.state.snapshot()
            snap["evaluation"] = self._latest_evaluation(snap["evaluation"])
        return {**snap, "exp": self.exp_dir.name, "exp_path": str(self.exp_dir.resolve()),
                "stream": str(self.follower.path), "stream_exists": self.follower.path.is_file(),
                "trainer": self._trainer, "server_time": time.time()}

    def _read_evaluation_file(self) -> bool:
        """Re-read the stage's evaluation file when it appeared or changed; True if so."""
        stage = self.state.run["stage"]
        path = evaluation_path(self.exp_dir, self._config_stage() if stage is None else stage)
        try:
            mtime = os.stat(path).st_mtime if path is not None else None
        except FileNotFoundError:
            mtime = None
        if mtime is None:
            changed, self._file_eval = self._file_eval is not None, None
            return changed
        if self._file_eval is not None and self._file_eval[:2] == (path, mtime):
            return False
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:  # mid-write or hand-edited: try again next refresh
            LOGGER.debug("cannot read %s yet: %s", path, err)
            return False
        self._file_eval = (path, mtime, clean({**content, "source": str(path), "time": mtime}))
        return True

    def _config_stage(self) -> int | None:
        """config_stage, read again only when the file changed (refresh runs every second)."""
        try:
            mtime = os.stat(self.exp_dir / "config.yaml").st_mtime
        except OSError:
            return None
        if self._saved_stage is None or self._saved_stage[0] != mtime:
            self._saved_stage = (mtime, config_stage(self.exp_dir))
        return self._saved_stage[1]

    def _latest_evaluation(self, from_stream: dict | None) -> dict | None:
        """The newer of the stream's stage_evaluation record and the evaluation file (`pillsnap evaluate` may
        rewrite the file long after the run). The verdict is the newer one's alone, never half of each (a NO-GO
        badge over an older "proceed"); for the same stage the older fills in only the details (measured results,
        criteria) the newer lacks."""
        from_file = self._file_eval[2] if self._file_eval else None
        started = self.state.run.get("started")
        if from_file is not None and isinstance(started, (int, float)) and from_file["time"] < started:
            from_file = None  # written before this run started: another run's verdict (or the one before a resume)
        candidates = sorted((e for e in (from_stream, from_file) if e), key=lambda e: e.get("time") or 0)
        if len(candidates) == 2 and candidates[0].get("stage") == candidates[1].get("stage"):
            details = {k: v for k, v in candidates[0].items() if k not in VERDICT_KEYS}
            return {**details, **candidates[1]}
        return candidates[-1] if candidates else None
