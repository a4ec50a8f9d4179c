"""Metrics stream follower and dashboard: partial lines wait, malformed lines are skipped, summary is right."""

import json

from fastapi.testclient import TestClient

from pillsnap.monitor import MetricsFollower, read_new_records, summarize
from pillsnap.monitor.dashboard import create_dashboard


def write(path, *records, tail=""):
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        fh.write(tail)


def test_incremental_read_leaves_partial_line(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, {"type": "step", "loss": 1.0}, tail='{"type": "st')
    records, offset = read_new_records(path)
    assert [r["loss"] for r in records] == [1.0]
    write(path, tail='ep", "loss": 0.5}\nnot json\n')
    more, offset2 = read_new_records(path, offset)
    assert [r["loss"] for r in more] == [0.5] and offset2 == path.stat().st_size
    assert read_new_records(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_summarize():
    records = [
        {"type": "step", "task": "classification", "global_step": 1, "loss": 2.0},
        {"type": "step", "task": "detection", "global_step": 2, "loss": 5.0},
        {"type": "step", "task": "classification", "global_step": 3, "loss": 1.5},
        {"type": "val", "task": "classification", "epoch": 1, "accuracy": 0.4},
        {"type": "oom", "retries": 1},
        {"type": "epoch", "epoch": 1},
    ]
    s = summarize(records)
    assert s["status"] == "running" and s["epoch"] == 1 and s["oom_events"] == 1
    assert s["last_step"]["classification"]["loss"] == 1.5
    assert s["loss_history"]["classification"] == [[1, 2.0], [3, 1.5]]
    assert s["last_val"]["classification"] == {"epoch": 1, "accuracy": 0.4}
    assert summarize(records + [{"type": "end", "status": "completed"}])["status"] == "completed"
    assert summarize([])["status"] == "waiting"


def test_follower_bounded(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, *[{"type": "step", "loss": float(i)} for i in range(10)])
    follower = MetricsFollower(path, max_records=4)
    assert len(follower.poll()) == 10
    assert [r["loss"] for r in follower.records] == [6.0, 7.0, 8.0, 9.0]


def test_dashboard_serves_page_and_summary(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    client = TestClient(create_dashboard(tmp_path))
    assert "PillSnap training monitor" in client.get("/").text
    assert client.get("/api/summary").json()["status"] == "waiting"
    write(reports / "metrics.jsonl", {"type": "val", "task": "detection", "epoch": 2, "mAP@0.5": 0.3})
    assert client.get("/api/summary").json()["last_val"]["detection"]["mAP@0.5"] == 0.3
