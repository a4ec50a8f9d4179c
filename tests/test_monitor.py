"""Monitor without a browser: the stream follower (partial lines, missing, truncated and replaced files), the state
the dashboard shows (per-task series, ETA, resume and restart, OOM, stage evaluation), the app over HTTP and
WebSocket, the system probe and the terminal table."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types
from collections import namedtuple

import pytest
from fastapi.testclient import TestClient

from pillsnap.monitor.dashboard import STATIC_DIR, create_dashboard
from pillsnap.monitor.delta import apply
from pillsnap.monitor.live import LiveRun
from pillsnap.monitor.state import MonitorState, Table
from pillsnap.monitor.stream import StreamFollower, read_new_records
from pillsnap.monitor.system import SystemProbe, nvml_reader, smi_reader
from pillsnap.monitor.terminal import render, title


def write(path, *records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        fh.write(tail)


def start(t=0.0, start_epoch=0, tasks=("classification", "detection"), epochs=4, stage=2):
    return {"type": "start", "time": t, "tasks": list(tasks), "epochs": epochs, "stage": stage,
            "start_epoch": start_epoch}


def step(t, epoch, i, steps=10, task="classification", epochs=4, loss=1.0, **extra):
    return {"type": "step", "time": t, "task": task, "epoch": epoch, "max_epochs": epochs, "step": i, "steps": steps,
            "global_step": (epoch - 1) * steps + i, "loss": loss, "lr": 1e-3, "n": 8, "data_time": 0.01,
            "compute_time": 0.09, "throughput": 80.0, "cuda_mem": 0.0, **extra}


def val(t, epoch, task="classification", **metrics):
    return {"type": "val", "time": t, "task": task, "epoch": epoch, "n": 16, **metrics}


# ---------- stream ----------

def test_incremental_read_leaves_partial_line(tmp_path):
    path = tmp_path / "m.jsonl"
    write(path, {"type": "step", "loss": 1.0}, tail='{"type": "st')
    records, offset = read_new_records(path)
    assert [r["loss"] for r in records] == [1.0]
    write(path, tail='ep", "loss": 0.5}\nnot json\n[1, 2]\n')
    more, offset2 = read_new_records(path, offset)
    assert [r["loss"] for r in more] == [0.5] and offset2 == path.stat().st_size
    assert read_new_records(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_a_long_stream_is_read_in_bounded_bites_and_shown_whole(tmp_path, monkeypatch):
    """A stream of hundreds of MB is not read into memory at once: each poll takes a bounded bite (here 4 KB), and
    one refresh applies them all, one after the other."""
    from pillsnap.monitor import stream as stream_module

    monkeypatch.setattr(stream_module, "READ_LIMIT", 4096)
    path = tmp_path / "reports" / "metrics.jsonl"
    write(path, start(t=0), *(step(i, 1 + i // 100, i % 100 + 1, steps=100) for i in range(400)))
    assert path.stat().st_size > 10 * 4096
    records, offset = read_new_records(path, 0, 4096)
    assert 0 < offset <= 4096 and len(records) < 50
    live = LiveRun(tmp_path)
    live.refresh()
    assert live.state.records == 401 and live.follower.offset == path.stat().st_size


def test_follower_waits_for_a_missing_file_then_reads_it(tmp_path):
    path = tmp_path / "reports" / "metrics.jsonl"
    follower = StreamFollower(path)
    assert follower.poll() == ([], False, False)
    write(path, start())
    chunk = follower.poll()
    assert [r["type"] for r in chunk.records] == ["start"] and not chunk.reset
    assert follower.poll() == ([], False, False)


def test_follower_starts_over_when_the_file_is_truncated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, start(), step(1, 1, 1), step(2, 1, 2))
    follower = StreamFollower(path)
    assert len(follower.poll().records) == 3
    with open(path, "w", encoding="utf-8") as fh:  # same inode, shorter: truncated in place
        fh.write(json.dumps(start(stage=3)) + "\n")
    chunk = follower.poll()
    assert chunk.reset and [r.get("stage") for r in chunk.records] == [3]


def test_follower_starts_over_when_the_file_is_replaced(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, start())
    follower = StreamFollower(path)
    follower.poll()
    new = tmp_path / "new.jsonl"
    write(new, start(stage=4), step(1, 1, 1), step(2, 1, 2))  # longer than the old file: only the inode tells
    os.replace(new, path)
    chunk = follower.poll()
    assert chunk.reset and len(chunk.records) == 3 and chunk.records[0]["stage"] == 4
    path.unlink()
    assert follower.poll() == ([], False, False)  # gone (a run being set up): nothing new, nothing reset


# ---------- state ----------

def test_state_builds_per_task_series_and_validation_history():
    state = MonitorState()
    assert state.snapshot()["run"]["status"] == "waiting" and state.snapshot()["tasks"] == {}
    state.apply_all([start(), step(10, 1, 5, loss=2.0), step(11, 1, 2, steps=4, task="detection", loss=5.0),
                     step(20, 1, 10, loss=1.5), val(21, 1, val_loss=1.2, acc=0.4, macro_f1=0.3, top5=0.9),
                     val(22, 1, task="detection", **{"mAP@0.5": 0.2, "num_images": 7}), {"type": "epoch", "epoch": 1},
                     step(30, 2, 5, loss=1.0), val(40, 2, val_loss=1.0, acc=0.6, macro_f1=0.25, top5=0.95)])
    snap = state.snapshot()
    cls, det = snap["tasks"]["classification"], snap["tasks"]["detection"]
    assert snap["run"]["stage"] == 2 and snap["run"]["epoch"] == 1 and snap["run"]["status"] == "running"
    assert cls["train"]["x"] == [0.5, 1.0, 1.5] and cls["train"]["loss"] == [2.0, 1.5, 1.0]
    assert det["train"]["x"] == [0.5] and det["train"]["loss"] == [5.0]
    assert cls["val"]["epoch"] == [1, 2] and cls["val"]["acc"] == [0.4, 0.6] and "n" not in cls["val"]
    assert det["val"]["mAP@0.5"] == [0.2] and "num_images" not in det["val"]
    assert cls["best"] == {"metric": "macro_f1", "value": 0.3, "epoch": 1}  # best follows macro-F1, not accuracy
    assert cls["last"]["loss"] == 1.0 and cls["epoch"] == 2 and cls["step"] == 5 and cls["progress"] == 1.5


def test_the_best_badge_picks_among_equal_epochs_as_the_trainer_does():
    """The detector's epochs equal on mAP@0.5 go to the higher mAP@0.5:0.95 (its best checkpoint's rule), then the
    first; a classifier's equal epochs to the first, as the trainer keeps its best."""
    state = MonitorState()
    det = [{"mAP@0.5": 0.9, "mAP@0.5:0.95": 0.5}, {"mAP@0.5": 1.0, "mAP@0.5:0.95": 0.6},
           {"mAP@0.5": 1.0, "mAP@0.5:0.95": 0.8}, {"mAP@0.5": 1.0, "mAP@0.5:0.95": 0.7},
           {"mAP@0.5": 1.0, "mAP@0.5:0.95": 0.8}]
    state.apply_all([start(), *(val(10 + e, e, task="detection", **m) for e, m in enumerate(det, start=1)),
                     val(20, 1, macro_f1=0.5), val(21, 2, macro_f1=0.7), val(22, 3, macro_f1=0.7)])
    tasks = state.snapshot()["tasks"]
    assert tasks["detection"]["best"] == {"metric": "mAP@0.5", "value": 1.0, "epoch": 3}
    assert tasks["classification"]["best"] == {"metric": "macro_f1", "value": 0.7, "epoch": 2}


def test_eta_from_the_pace_since_the_first_step():
    state = MonitorState()
    state.apply_all([start(t=0), step(100, 1, 1), step(190, 1, 10)])  # 0.9 epoch in 90 s: 100 s per epoch
    snap = state.snapshot()
    assert snap["tasks"]["classification"]["eta"] == pytest.approx(300.0)  # 3 of 4 epochs left
    state.apply_all([step(150, 1, 5, task="detection"), step(160, 1, 10, task="detection")])  # 10 s per 0.5 epoch
    assert state.snapshot()["tasks"]["detection"]["eta"] == pytest.approx(60.0)
    assert state.snapshot()["run"]["eta"] == pytest.approx(300.0)  # interleaved: the slowest task decides
    state.apply({"type": "end", "time": 200, "status": "early_stopped"})
    assert state.snapshot()["run"]["eta"] is None and state.snapshot()["run"]["status"] == "early_stopped"


def test_the_eta_says_when_the_stages_time_cap_ends_the_run_first():
    """Stage 3 caps a run at 8 h, stage 4 at 48: an ETA past the cap said nothing until the verdict. The start
    record carries the cap; the title says how long is left on it, and when it comes before the ETA."""
    from pillsnap.monitor.terminal import cap_note

    state = MonitorState()
    state.apply_all([{**start(t=0), "time_limit_hours": 0.1}, step(100, 1, 1), step(190, 1, 10)])  # a 360 s cap
    run = state.snapshot()["run"]
    assert run["time_limit_s"] == pytest.approx(360.0) and run["eta"] == pytest.approx(300.0)
    assert cap_note(run, now=190) == " (the 6m00s time cap ends it first, in 2m50s)"
    state.apply({**start(t=0), "time_limit_hours": 1.0})  # a fresh run with an hour: the ETA comes first
    state.apply_all([step(100, 1, 1), step(190, 1, 10)])
    assert cap_note(state.snapshot()["run"], now=190) == " (time cap in 56m50s)"
    state.apply({**start(t=0), "time_limit_hours": None})
    assert state.snapshot()["run"]["time_limit_s"] is None and cap_note(state.snapshot()["run"]) == ""


def test_eta_unknown_until_two_steps_and_zero_when_finished():
    state = MonitorState()
    state.apply_all([start(epochs=1), step(5, 1, 3, epochs=1)])
    assert state.snapshot()["tasks"]["classification"]["eta"] is None
    state.apply(val(9, 1, acc=0.5))
    task = state.snapshot()["tasks"]["classification"]
    assert task["finished"] and task["eta"] == 0.0


def test_a_task_done_before_the_run_is_finished_and_leaves_the_run_eta():
    """The classifier stops early after epoch 2 of 4 while the detector goes on (or the plan gives it fewer
    epochs): it shows as done, and the run's ETA is the detector's alone, not the classifier's frozen at its last
    step."""
    state = MonitorState()
    state.apply_all([start(t=0), step(10, 1, 10), step(10, 1, 10, task="detection"), val(11, 1, acc=0.5),
                     {"type": "epoch", "epoch": 1, "stopped_early": []}, step(20, 2, 10),
                     step(20, 2, 10, task="detection"), val(21, 2, acc=0.5),
                     {"type": "epoch", "epoch": 2, "stopped_early": ["classification"]},
                     step(25, 3, 10, task="detection")])
    snap = state.snapshot()
    cls = snap["tasks"]["classification"]
    assert cls["finished"] and cls["stopped_early"] and cls["eta"] == 0.0
    assert snap["run"]["eta"] == pytest.approx(snap["tasks"]["detection"]["eta"]) and snap["run"]["eta"] < 10
    planned = MonitorState()  # the plan trains the classifier in epochs 1-2 only: done once epoch 2 is validated
    planned.apply_all([{**start(t=0), "last_epochs": {"classification": 2, "detection": 4}}, step(10, 1, 10),
                       val(11, 1, acc=0.5), step(20, 2, 10), val(21, 2, acc=0.5)])
    cls = planned.snapshot()["tasks"]["classification"]
    assert cls["finished"] and not cls["stopped_early"] and cls["max_epochs"] == 2
    restarted = MonitorState()  # a torchrun restart before the first checkpoint: the same job, not a new run
    restarted.apply_all([start(t=0), {"type": "oom", "task": "classification"}, {**start(t=5), "restart": 1},
                         {"type": "stage_evaluation", "stage": 2, "status": "NO_GO", "time": 6}])
    assert len(restarted.snapshot()["oom"]) == 1
    restarted.apply({**start(t=9, start_epoch=2)})  # resumed after that evaluation: its verdict is not this one's
    assert restarted.snapshot()["evaluation"] is None
    resumed = MonitorState()  # a resume says which tasks had stopped before it
    resumed.apply_all([{**start(t=0, start_epoch=2), "stopped_early": ["classification"]}])
    assert resumed.snapshot()["tasks"]["classification"]["finished"]


def test_resume_drops_the_redone_epoch_and_restarts_the_eta_clock():
    state = MonitorState()
    state.apply_all([start(t=0), step(10, 1, 10, loss=3.0), val(11, 1, acc=0.3), {"type": "epoch", "epoch": 1},
                     step(20, 2, 5, loss=2.0), val(21, 2, acc=0.99)])  # epoch 2 killed before its checkpoint
    state.apply_all([start(t=1000, start_epoch=1), step(1010, 2, 2, loss=2.5)])
    snap = state.snapshot()
    cls = snap["tasks"]["classification"]
    assert snap["run"]["resumes"] == 1 and snap["run"]["start_epoch"] == 1 and snap["run"]["status"] == "running"
    assert cls["train"]["loss"] == [3.0, 2.5] and cls["val"]["epoch"] == [1]
    assert cls["eta"] is None  # one step since the resume: no pace yet (the downtime is not a pace)
    state.apply(step(1020, 2, 4))
    assert state.snapshot()["tasks"]["classification"]["eta"] == pytest.approx((4 - 1.4) * 10 / 0.2)


def test_a_resume_inside_an_epoch_keeps_the_steps_before_its_save():
    """Epoch 1 killed at step 7 of 10 after a save at step 4 (0.4 epochs): the resume (start_epoch 0, so not a
    fresh run) keeps steps 1-4 and redoes 5-7."""
    state = MonitorState()
    state.apply_all([start(t=0), *(step(i, 1, i, loss=10.0 - i) for i in range(1, 8))])
    resumed = {**start(t=100), "resumed_at": {"classification": 0.4}}
    state.apply_all([resumed, step(105, 1, 5, loss=0.5)])
    snap = state.snapshot()
    assert snap["run"]["resumes"] == 1 and snap["run"]["inside_epoch"] == 1
    assert snap["tasks"]["classification"]["train"]["loss"] == [9.0, 8.0, 7.0, 6.0, 0.5]


def test_a_fresh_start_in_the_same_file_forgets_the_previous_run():
    state = MonitorState()
    state.apply_all([start(stage=1), step(1, 1, 1, task="detection"), {"type": "oom", "task": "detection"},
                     {"type": "stage_evaluation", "stage": 1, "status": "GO"}, {"type": "end", "status": "completed"}])
    state.apply(start(stage=2, tasks=("classification",)))
    snap = state.snapshot()
    assert snap["run"]["stage"] == 2 and list(snap["tasks"]) == ["classification"]
    assert snap["oom"] == [] and snap["evaluation"] is None and snap["run"]["status"] == "running"


def test_oom_events_evaluation_and_unknown_records():
    state = MonitorState()
    version = state.version
    state.apply_all([start(), step(1, 1, 3, task="detection"),
                     {"type": "oom", "time": 2, "task": "detection", "retries": 1, "global_step": 3,
                      "action": "microbatching", "state": {"batch_size": 4, "grad_accum": 2}},
                     {"type": "something_new", "time": 3},
                     {"type": "stage_evaluation", "time": 4, "stage": 2, "status": "NO_GO",
                      "recommendation": "RECOMMEND_OPTIMIZE", "reasons": ["mAP@0.5 0.00 < 0.30"]}])
    snap = state.snapshot()
    assert snap["oom"][0]["action"] == "microbatching" and snap["oom"][0]["epoch"] == 1
    assert snap["evaluation"]["status"] == "NO_GO" and snap["evaluation"]["reasons"] == ["mAP@0.5 0.00 < 0.30"]
    assert state.version > version and snap["records"] == 4  # the unknown record was ignored, not counted


def test_nan_loss_is_shown_as_text_and_a_gap_and_the_snapshot_is_strict_json():
    state = MonitorState()
    state.apply_all([start(), step(1, 1, 1, loss=1.0), step(2, 1, 2, loss=math.nan)])
    snap = state.snapshot()
    cls = snap["tasks"]["classification"]
    assert cls["last"]["loss"] == "nan" and cls["train"]["loss"] == [1.0, None]
    json.dumps(snap, allow_nan=False)  # a NaN would make the browser's JSON.parse fail


def test_table_thins_evenly_and_stays_bounded():
    table = Table(("x", "epoch"), max_rows=8)
    for i in range(100):
        table.append({"x": float(i), "epoch": 1 + i // 50})
    xs = table.columns["x"]
    assert len(xs) <= 8 and xs[0] == 0.0
    gaps = {b - a for a, b in zip(xs, xs[1:], strict=False)}
    assert len(gaps) == 1  # evenly spaced after thinning
    table.drop_after_epoch(1)
    assert all(x < 50 for x in table.columns["x"])


@pytest.mark.parametrize("at", [0, 37, 63, 99])
def test_a_thinned_loss_chart_still_shows_a_spike_and_a_nan_loss_where_they_were(at):
    """At a multi-day run's stride (256 at Stage 4) a loss spike or a NaN loss minutes long fell between the kept
    rows: the peak column's rows stand for the worst of the rows since the one before, while the loss itself stays
    sampled (the worst of every row lifted a flat loss of 1.0 +- 0.25 to 1.7 on the chart)."""
    for bad in (9.0, float("nan")):
        table = Table(("x", "loss", "lr"), max_rows=8, peaks={"loss_peak": "loss"})
        for i in range(100):
            table.append({"x": float(i), "loss": bad if i == at else 1.0 + 0.25 * (-1) ** i, "lr": 0.1})
        xs, peaks = table.columns["x"], table.columns["loss_peak"]
        want = None if bad != bad else bad
        shown = [x for x, peak in zip(xs, peaks, strict=True) if peak == want]
        if at > xs[-1]:  # after the last kept row: carried to the next one
            assert shown == [] and table._pending["loss_peak"] == want
            continue
        assert len(shown) == 1, peaks
        assert at <= shown[0] < at + table.stride  # at the first kept row at or after it, a stride's width at most
        # the loss as sampled: the kept rows' own values, neither lifted by their neighbours nor the spike's
        assert table.columns["loss"] == [want if x == at else 1.0 + 0.25 * (-1) ** int(x) for x in xs]
        assert table.columns["lr"] == [0.1] * len(xs)


def test_a_resume_keeps_a_spike_before_where_it_goes_on_and_forgets_one_it_redoes():
    table = Table(("x", "epoch", "loss"), max_rows=8, peaks={"loss_peak": "loss"})
    for i in range(58):  # stride 8 by now; row 57 pending
        table.append({"x": i / 10, "epoch": 1 + i // 10, "loss": 9.0 if i == 57 else 1.0})
    assert table.stride == 8 and table._pending["loss_peak"] == 9.0
    table.drop_after_epoch(5, upto=5.8)  # the spike at 5.7 came before the resume's place: it stays
    assert table._pending["loss_peak"] == 9.0
    table.drop_after_epoch(5, upto=5.65)  # redone by the resume: forgotten
    assert table._pending == {}


def test_the_page_hears_from_the_server_while_a_long_stream_is_first_read(tmp_path):
    """After days unwatched the first read of a 250 MB stream takes seconds: the pushes waited on it, system
    samples too, and the page said "no word from the server"."""
    import asyncio
    import threading
    import time

    from pillsnap.monitor.dashboard import push_updates

    write(tmp_path / "reports" / "metrics.jsonl", start(t=1.0))
    live = LiveRun(tmp_path)
    sent: list[tuple[str, float]] = []

    class Page:
        async def send_text(self, text):
            sent.append((json.loads(text)["kind"], time.monotonic()))

    class Probe:
        def sample(self):
            return {"cpu_percent": 1.0}

    reading = threading.Event()

    def slow_first_read():
        with live._lock:  # as the read the server starts with holds it
            reading.set()
            time.sleep(1.5)
        live.refresh()

    async def watch():
        reader = threading.Thread(target=slow_first_read)
        reader.start()
        reading.wait()
        started = time.monotonic()
        task = asyncio.ensure_future(push_updates(Page(), live, Probe(), poll_s=0.05, system_s=10))
        await asyncio.sleep(2.5)
        task.cancel()
        reader.join()
        return started

    started = asyncio.run(watch())
    kinds = [kind for kind, _ in sent]
    assert kinds[:2] == ["system", "state"]
    assert sent[0][1] - started < 1.0  # the sample came while the stream was still being read


def test_the_runs_eta_says_it_leaves_out_a_task_that_has_not_started():
    """train.strategy=sequential: 50 classifier epochs, then the detector's. The ETA was the classifier's alone, said
    as the run's (20 h where 45 h were left); it is now given as a lower bound naming the task left out."""
    state = MonitorState()
    state.apply_all([{**start(t=0, epochs=100), "last_epochs": {"classification": 50, "detection": 100}},
                     step(0, 1, 1, epochs=50), step(1800, 1, 10, epochs=50)])
    snap = {**state.snapshot(), "exp": "exp"}
    assert snap["run"]["eta_waiting"] == ["detection"] and snap["run"]["eta"] > 0
    assert "ETA >= " in title(snap) and "(not counting detection: no step yet)" in title(snap)
    state.apply(step(1900, 1, 1, task="detection", epochs=100))  # both under way: the slower one's, as before
    assert state.snapshot()["run"]["eta_waiting"] == []
    alone = MonitorState()  # `--only detection`: the classifier is planned no epoch, not waited for
    alone.apply_all([{**start(t=0, epochs=10), "last_epochs": {"classification": 0, "detection": 10}},
                     step(0, 1, 1, task="detection", epochs=10), step(60, 1, 5, task="detection", epochs=10)])
    assert alone.snapshot()["run"]["eta_waiting"] == []


def test_a_stream_that_lost_its_start_record_takes_the_stage_from_the_runs_config(tmp_path):
    """A metrics.jsonl truncated or rotated during a Stage 4 run has no start record: the page showed the newest
    evaluation file of any stage (stage 1's, in a folder reused) as this run's verdict."""
    reports = tmp_path / "reports"
    write(reports / "metrics.jsonl", step(1000, 97, 3))
    (reports / "stage_1_evaluation.json").write_text(json.dumps({"stage": 1, "status": "NO_GO"}))
    (tmp_path / "config.yaml").write_text("data:\n  progressive_validation:\n    current_stage: 4\n")
    live = LiveRun(tmp_path)
    live.refresh()
    assert live.snapshot()["run"]["stage"] is None and live.snapshot()["evaluation"] is None
    (reports / "stage_4_evaluation.json").write_text(json.dumps({"stage": 4, "status": "GO"}))
    live.refresh()
    assert live.snapshot()["evaluation"]["status"] == "GO"
    (tmp_path / "config.yaml").unlink()  # no config either: the newest file, as before
    os.utime(reports / "stage_1_evaluation.json", (2e9, 2e9))
    live.refresh()
    assert live.snapshot()["evaluation"]["stage"] == 1


def test_live_run_reads_the_stage_evaluation_file_and_prefers_the_newest(tmp_path):
    stream = tmp_path / "reports" / "metrics.jsonl"
    write(stream, start(t=100, stage=3))
    live = LiveRun(tmp_path)
    live.refresh()
    assert live.snapshot()["evaluation"] is None
    (tmp_path / "reports" / "stage_2_evaluation.json").write_text(json.dumps({"status": "GO"}))  # another stage's
    live.refresh()
    assert live.snapshot()["evaluation"] is None
    evaluation = tmp_path / "reports" / "stage_3_evaluation.json"
    evaluation.write_text(json.dumps({"stage": 3, "status": "GO", "recommendation": "RECOMMEND_PROCEED",
                                      "reasons": ["all mandatory checks passed"], "results": {"device": "cpu"}}))
    os.utime(evaluation, (200, 200))
    version = live.state.version
    assert live.refresh() > version
    assert live.snapshot()["evaluation"]["status"] == "GO"
    write(stream, {"type": "stage_evaluation", "time": 300, "stage": 3, "status": "NO_GO", "reasons": []})
    live.refresh()
    shown = live.snapshot()["evaluation"]
    assert shown["status"] == "NO_GO" and shown["reasons"] == []  # the stream's record is newer...
    assert shown["results"] == {"device": "cpu"}  # ...the file fills in the details it lacks...
    assert "recommendation" not in shown  # ...but never half a verdict: no "proceed" from the older evaluation
    os.utime(evaluation, (400, 400))  # `pillsnap evaluate` rewrote the file later
    live.refresh()
    assert live.snapshot()["evaluation"]["status"] == "GO"
    write(stream, start(t=500, stage=3))  # a fresh run in the folder: neither verdict is of this run
    live.refresh()
    assert live.snapshot()["evaluation"] is None


# ---------- app ----------

def test_app_serves_an_offline_page_and_the_state(tmp_path):
    client = TestClient(create_dashboard(tmp_path))
    html = client.get("/").text
    assert "PillSnap training monitor" in html and 'id="connection"' in html
    for name in re.findall(r'(?:src|href)="static/([^"]+)"', html):
        assert client.get(f"/static/{name}").status_code == 200
    for path in STATIC_DIR.iterdir():  # no CDN: nothing is fetched from another host
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text) and "cdn" not in text.lower(), path.name
    snap = client.get("/api/state").json()
    assert snap["run"]["status"] == "waiting" and snap["stream_exists"] is False
    write(tmp_path / "reports" / "metrics.jsonl", start(), val(5, 1, task="detection", **{"mAP@0.5": 0.3}))
    assert client.get("/api/state").json()["tasks"]["detection"]["last_val"]["mAP@0.5"] == 0.3
    assert client.get("/api/health").json()["app"] == "pillsnap-monitor"


def test_websocket_pushes_state_system_and_new_records(tmp_path):
    client = TestClient(create_dashboard(tmp_path, poll_s=0.05, system_s=0.05))
    stream = tmp_path / "reports" / "metrics.jsonl"
    with client.websocket_connect("/ws") as ws:
        kinds = {}
        while len(kinds) < 2:
            msg = ws.receive_json()
            kinds[msg["kind"]] = msg["data"]
        assert kinds["state"]["run"]["status"] == "waiting" and "cpu_percent" in kinds["system"]
        write(stream, start(), step(1, 1, 1, loss=0.4321))
        held = kinds["state"]
        for _ in range(200):  # bounded: the change arrives within a few polls, as a patch of the state sent
            msg = ws.receive_json()
            assert msg["kind"] != "state"  # sent whole once
            if msg["kind"] == "patch":
                held = apply(held, msg["data"])
                if held["tasks"]:
                    break
        assert held["tasks"]["classification"]["last"]["loss"] == 0.4321
        assert held["run"]["status"] == "running"


# ---------- system probe and terminal ----------

def test_system_probe_reports_cpu_ram_disk_and_says_why_there_is_no_gpu(tmp_path):
    probe = SystemProbe(tmp_path / "not" / "yet", min_interval=0)
    probe._gpu_checked, probe._gpu_reader = True, None
    sample = probe.sample()
    assert 0 <= sample["cpu_percent"] <= 100 and sample["ram_total_gb"] > 0 and sample["disk"]["free_gb"] >= 0
    assert sample["gpus"] == [] and "no NVIDIA GPU" in sample["gpu_note"]
    probe._gpu_reader = lambda: [{"index": 0, "name": "H200", "mem_percent": 50.0}]
    assert probe.sample()["gpus"][0]["name"] == "H200" and probe.sample()["gpu_note"] is None


def test_terminal_table_shows_each_task(tmp_path):
    from rich.console import Console

    state = MonitorState()
    state.apply_all([start(), step(100, 1, 1), step(190, 1, 10, loss=0.25), val(191, 1, acc=0.75, macro_f1=0.5)])
    snap = {**state.snapshot(), "exp": "exp"}
    console = Console(width=160, record=True)
    console.print(render(snap))
    text = console.export_text()
    assert "classification" in text and "0.25" in text and "acc=0.750" in text and "Go/No-Go pending" in text
    console.print(render({**MonitorState().snapshot(), "exp": "exp"}))
    assert "waiting for the first step" in console.export_text()
    decided = {**snap, "evaluation": {"status": "NO_GO", "recommendation": "SUGGEST_OPTIMIZE"}}
    assert "Go/No-Go NO_GO (SUGGEST_OPTIMIZE)" in title(decided)


def test_cpu_percent_is_measured_between_samples_whatever_thread_takes_them(tmp_path, monkeypatch):
    import threading

    from pillsnap.monitor import system

    Times = namedtuple("Times", "user system idle iowait")
    readings = iter([Times(10, 0, 10, 0), Times(25, 0, 14, 1)])  # 20 s of CPU time, 5 of them idle or waiting
    monkeypatch.setattr(system.psutil, "cpu_times", lambda: next(readings))
    probe = SystemProbe(tmp_path, min_interval=0)
    probe._gpu_checked = True
    result = []
    worker = threading.Thread(target=lambda: result.append(probe.sample()["cpu_percent"]))
    worker.start()
    worker.join()
    assert result == [75.0]


def test_gpu_memory_through_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H200, 71680, 143771, 97'\necho '1, NVIDIA H200, 0, 143771, [N/A]'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    gpus = smi_reader()()
    assert [g["name"] for g in gpus] == ["NVIDIA H200"] * 2
    assert gpus[0]["mem_percent"] == pytest.approx(49.9, abs=0.1)
    assert gpus[0]["mem_total_gb"] == pytest.approx(140.4, abs=0.01)
    assert gpus[0]["util_percent"] == 97.0 and gpus[1]["util_percent"] is None


def test_gpu_memory_through_nvml_and_no_driver(monkeypatch):
    class NVMLError(Exception):
        pass

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 1024**3, total=8 * 1024**3),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=55))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_reader()() == [{"index": 0, "name": "NVIDIA H200", "mem_used_gb": 2.0, "mem_total_gb": 8.0,
                                "mem_percent": 25.0, "util_percent": 55}]

    def not_supported(handle):
        raise NVMLError("Not Supported")

    monkeypatch.setattr(fake, "nvmlDeviceGetUtilizationRates", not_supported)  # a MIG-partitioned GPU
    assert nvml_reader()()[0]["mem_used_gb"] == 2.0 and nvml_reader()()[0]["util_percent"] is None

    def no_driver():
        raise NVMLError("Driver Not Loaded")

    monkeypatch.setattr(fake, "nvmlInit", no_driver)
    assert nvml_reader() is None


def test_a_gpu_reading_that_hangs_holds_back_no_training_update(tmp_path, monkeypatch):
    """NVML has no timeout: a reading stuck for 20 s held the state's updates back for as long (each poll waited
    for the sample). The sample is taken beside them; the page gets it when it comes."""
    import threading

    released = threading.Event()

    def stuck_gpus(self):
        released.wait(30)
        return [], "GPU reading stuck (test)"

    monkeypatch.setattr(SystemProbe, "_gpus", stuck_gpus)
    client = TestClient(create_dashboard(tmp_path, poll_s=0.05, system_s=0.05))
    stream = tmp_path / "reports" / "metrics.jsonl"
    try:
        with client.websocket_connect("/ws") as ws:
            first = ws.receive_json()
            assert first["kind"] == "state"
            write(stream, start(), step(1, 1, 1, loss=0.4321))
            msg = ws.receive_json()  # the new step, while the GPU reading still hangs
            assert msg["kind"] == "patch"
            assert apply(first["data"], msg["data"])["tasks"]["classification"]["last"]["loss"] == 0.4321
            released.set()
            while (msg := ws.receive_json())["kind"] != "system":
                pass
            assert msg["data"]["gpu_note"] == "GPU reading stuck (test)"
    finally:
        released.set()


def test_exp_defaults_to_the_configs_exp_dir(tmp_path):
    import argparse

    from pillsnap.monitor.cli import resolve_exp

    cfg = tmp_path / "config.yaml"
    oom = "  oom: {max_retries: 4, max_grad_accum: 8, min_batch: 1, cooldown_sec: 0, escalate_to_fp16: true}\n"
    cfg.write_text(f"paths:\n  exp_dir: {tmp_path / 'runs' / 'stage3'}\ntrain:\n{oom}")
    assert resolve_exp(argparse.Namespace(exp=None, cfg=str(cfg))) == tmp_path / "runs" / "stage3"
    assert resolve_exp(argparse.Namespace(exp="elsewhere", cfg=str(cfg))).name == "elsewhere"


def test_the_trainer_process_behind_a_running_stream(tmp_path):
    """A run killed or crashed writes no end record: the stream says "running" for good. The process that holds
    the folder for training (its run.lock) tells a dead run from a quiet one (a long validation)."""
    import signal
    import socket
    import subprocess
    import time

    from pillsnap.utils.locks import RUN_LOCK, file_lock

    exp = tmp_path / "exp"
    (exp / "reports").mkdir(parents=True)
    (exp / "reports" / "metrics.jsonl").write_text(json.dumps(start(t=time.time())) + "\n", encoding="utf-8")
    live = LiveRun(exp)

    def seen() -> dict:
        version = live.state.version
        assert live.refresh() > version  # a change of the trainer is a new state (the page gets it pushed)
        return {**live.snapshot(), "exp": "exp"}

    assert live.snapshot()["trainer"] is None  # a run from before the lock: nothing to say
    with file_lock(exp / RUN_LOCK, role="train"):
        trainer = seen()["trainer"]
        assert trainer["pid"] == os.getpid() and trainer["alive"] is True
    snap = seen()  # let go without an end record (an exception in a notebook): the folder is no run's
    assert snap["trainer"]["alive"] is False
    assert f"stopped (the trainer, pid {os.getpid()}, has ended without an end record)" in title(snap)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pillsnap.utils.locks import file_lock\n"
                               f"with file_lock({str(exp / RUN_LOCK)!r}, role='train'):\n"
                               "    print('held', flush=True)\n    time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    trainer = seen()["trainer"]
    assert trainer["pid"] == holder.pid and trainer["alive"] is True
    holder.send_signal(signal.SIGKILL)  # killed: no word, no release
    holder.wait()
    assert seen()["trainer"]["alive"] is False
    info = json.loads((exp / RUN_LOCK).read_text())
    assert "released_unix" not in info
    (exp / RUN_LOCK).write_text(json.dumps({**info, "pid": os.getpid()}))
    assert live.refresh() and live.snapshot()["trainer"]["alive"] is False  # a pid a newer process took over
    (exp / RUN_LOCK).write_text(json.dumps({**info, "host": socket.gethostname() + "-other"}))
    assert seen()["trainer"]["alive"] is None  # another machine's process: not seen from here
    (exp / RUN_LOCK).write_text(json.dumps({**info, "pid_ns": "pid:[1]"}))
    assert seen()["trainer"]["alive"] is None  # another container's process ids
    (exp / RUN_LOCK).write_text(json.dumps({**info, "role": "evaluate"}))
    assert seen()["trainer"] is None  # `pillsnap evaluate` holds or held the folder: not a trainer


def test_terminal_stops_following_a_run_whose_trainer_is_gone(tmp_path, monkeypatch):
    """`pillsnap monitor --terminal` follows a running stream until it ends; a killed trainer never ends it."""
    import time

    import pillsnap.monitor.cli as monitor_cli
    from pillsnap.utils.locks import RUN_LOCK, file_lock

    exp = tmp_path / "exp"
    (exp / "reports").mkdir(parents=True)
    (exp / "reports" / "metrics.jsonl").write_text(json.dumps(start(t=time.time())) + "\n", encoding="utf-8")
    with file_lock(exp / RUN_LOCK, role="train"):
        pass  # let go without an end record

    def kept_following(seconds):
        raise AssertionError("the table kept following a run whose trainer has ended")

    monkeypatch.setattr(monitor_cli.time, "sleep", kept_following)
    assert monitor_cli.run_terminal(exp, 0.01) == 0


def test_torchruns_restart_after_an_oom_is_followed_as_the_same_run_and_rates_are_the_jobs(tmp_path, monkeypatch):
    """Under torchrun --max-restarts a rank's OOM ends the processes with an end record, and torchrun starts them
    again by itself: `--terminal` stopped following there and the page said "OOM exit, resume it yourself". The
    step records are rank 0's own: the page called one GPU's images a second the run's."""
    import time

    from rich.console import Console

    import pillsnap.monitor.cli as monitor_cli

    now = time.time()
    ddp = {"world_size": 8, "max_restarts": 1}
    state = MonitorState()
    state.apply_all([{**start(t=now), **ddp}, step(now + 1, 1, 1),
                     {"type": "end", "time": now + 2, "status": "oom_emergency_exit"}])
    snap = {**state.snapshot(), "exp": "exp"}
    assert snap["run"]["status"] == "restarting"
    assert snap["run"]["restarting"] == {"after": "oom_emergency_exit", "next": 1, "max": 1}
    assert "restarting (after oom_emergency_exit: torchrun's restart 1 of 1)" in title(snap)
    console = Console(width=160, record=True)
    console.print(render(snap))
    assert "640.0" in console.export_text()  # 80 img/s on rank 0, eight ranks stepping together
    # the restart comes back; its own OOM, with no restart left, is the run's end
    state.apply_all([{**start(t=now + 3, start_epoch=1), **ddp, "restart": 1}, step(now + 4, 2, 1),
                     {"type": "end", "time": now + 5, "status": "oom_emergency_exit"}])
    assert state.snapshot()["run"]["status"] == "oom_emergency_exit"
    # a restart that never comes (a set-up error, a rendezvous that never completes): stopped, after a grace
    from pillsnap.monitor.terminal import RESTART_GRACE_S, trainer_gone

    waiting = MonitorState()
    ended = now - RESTART_GRACE_S - 10
    waiting.apply_all([{**start(t=ended), **ddp}, {"type": "end", "time": ended, "status": "crashed"}])
    gone = {**waiting.snapshot(), "exp": "exp", "trainer": {"pid": 1, "alive": False}}
    assert not trainer_gone(gone, now=ended + 60) and trainer_gone(gone, now=ended + RESTART_GRACE_S + 1)
    assert "torchrun's restart 1 has not come" in title(gone)
    # no end record at all (rank 0 killed waiting in a collective after another rank's OOM, under NCCL): a restart
    # may come while torchrun has restarts left, for the same grace
    from pillsnap.monitor.terminal import restart_may_come

    silent = MonitorState()
    silent.apply_all([{**start(t=now - 30), **ddp}, step(now - 20, 1, 1)])
    killed = {**silent.snapshot(), "exp": "exp", "trainer": {"pid": 1, "alive": False}}
    assert restart_may_come(killed) and not trainer_gone(killed)
    assert "restarting? (the trainer ended without an end record" in title(killed)
    assert trainer_gone(killed, now=now + RESTART_GRACE_S)
    spent = {**killed, "run": {**killed["run"], "restart": 1}}  # no restart left: stopped at once
    assert trainer_gone(spent) and not restart_may_come(spent)

    exp = tmp_path / "exp"
    stream = exp / "reports" / "metrics.jsonl"
    write(stream, {**start(t=now), **ddp}, step(now + 1, 1, 1),
          {"type": "end", "time": now + 2, "status": "oom_emergency_exit"})
    waits = []

    def restarted(seconds):  # while the table waits, torchrun's restart starts and ends the run
        waits.append(seconds)
        if len(waits) > 1:
            raise AssertionError("kept following a run that has ended")
        write(stream, {**start(t=now + 3, start_epoch=1), **ddp, "restart": 1}, step(now + 4, 2, 1),
              {"type": "end", "time": now + 5, "status": "completed"})

    monkeypatch.setattr(monitor_cli.time, "sleep", restarted)
    assert monitor_cli.run_terminal(exp, 0.01) == 0 and len(waits) == 1


def test_the_work_after_training_is_shown_until_its_verdict(tmp_path):
    """At Stage 4 the calibration, the evaluation and the final test take hours after the end record: the page
    said "completed", decision "pending", throughout, and `--terminal` stopped following at the end record."""
    from pillsnap.monitor.terminal import after_training_under_way
    from pillsnap.train import after_training_phase

    exp = tmp_path / "exp"
    write(exp / "reports" / "metrics.jsonl", start(), step(1, 1, 1), {"type": "end", "time": 2, "status": "completed"})
    with after_training_phase(exp, "reports"):
        pass
    with after_training_phase(exp, "calibration"):
        live = LiveRun(exp)
        live.refresh()
        snap = live.snapshot()
        assert snap["run"]["status"] == "completed" and snap["run"]["after"]["step"] == "calibration"
        assert after_training_under_way(snap) and "Go/No-Go pending (after training: calibration)" in title(snap)
    with pytest.raises(RuntimeError), after_training_phase(exp, "stage_evaluation"):
        raise RuntimeError("the evaluation failed")
    live.refresh()
    snap = live.snapshot()
    assert not after_training_under_way(snap) and snap["run"]["after"] == {
        "step": "stage_evaluation", "since": snap["run"]["after"]["since"], "failed": True}
    assert "the work after training failed at stage_evaluation" in title(snap)
    # each step fails alone: while the trainer still holds the folder the next one comes, and --terminal follows
    assert after_training_under_way({**snap, "trainer": {"pid": 1, "alive": True}})
    assert not after_training_under_way({**snap, "trainer": {"pid": 1, "alive": False}})
    events = [(r["step"], r["event"]) for r in map(json.loads, (exp / "reports" / "metrics.jsonl").read_text()
                                                   .splitlines()) if r["type"] == "after_training"]
    assert events == [("reports", "start"), ("reports", "done"), ("calibration", "start"), ("calibration", "done"),
                      ("stage_evaluation", "start"), ("stage_evaluation", "failed")]
    # a step that fails costs that step only: the next one done does not hide it, a later run's does
    with after_training_phase(exp, "final_test"):
        pass
    live.refresh()
    snap = live.snapshot()
    assert snap["run"]["after"] is None and snap["run"]["after_failed"] == ["stage_evaluation"]
    assert "the work after training failed at stage_evaluation" in title(snap)
    with after_training_phase(exp, "stage_evaluation"):
        pass
    live.refresh()
    assert live.snapshot()["run"]["after_failed"] == []


def test_the_page_is_sent_what_changed_and_ends_with_the_state_whole():
    """After the first state, the server sends patches (pillsnap.monitor.delta): applied one after the other they
    give every state exactly, through a chart thinned to half its rows, a stream replaced, keys that come and go;
    and they are a small part of the state they bring (each step record changes a few hundred bytes of ~50 KB)."""
    import json as json_module

    from pillsnap.monitor.dashboard import state_message
    from pillsnap.monitor.delta import apply, diff

    state = MonitorState(max_rows=40)  # thinned every 40 rows: a run of 300 steps thins several times
    records = [start(0.0, epochs=30)]
    for epoch in range(1, 31):
        records += [step(epoch * 10.0 + i, epoch, i, loss=1.0 / (epoch + i)) for i in range(10)]
        records.append(val(epoch * 10.0 + 9.5, epoch, acc=0.5 + epoch / 100))
    records.insert(150, {"type": "oom", "time": 150.0, "task": "classification", "action": "microbatching"})
    held, whole, patched, kinds = None, 0, 0, set()
    for index, record in enumerate(records):
        state.apply_all([record], reset=index == 200)  # the stream replaced once
        new = json_module.loads(json_module.dumps(state.snapshot()))
        message = json_module.loads(state_message(held, new))
        kinds.add(message["kind"])
        if message["kind"] == "state":
            held = message["data"]
        else:
            held = apply(held, message["data"])
            patched += len(json_module.dumps(message))
            whole += len(json_module.dumps({"kind": "state", "data": new}))
        assert json_module.dumps(held, sort_keys=True) == json_module.dumps(new, sort_keys=True), index
    assert kinds == {"state", "patch"}
    assert patched < whole / 5
    assert state_message(held, held) is None  # nothing changed: nothing sent
    assert diff({"a": [1, 2]}, {"a": [1, 2, 3]}) == {"~": {"a": {"+": [3]}}}
    assert diff({"a": [1, 2]}, {"a": [2]}) == {"~": {"a": {"=": [2]}}}  # thinned: replaced whole
    assert diff({"a": 1, "b": 2}, {"a": 1}) == {"-": ["b"]}
    assert diff({"a": 1}, {"a": True}) == {"~": {"a": {"=": True}}}  # 1 and true differ in JSON
    assert diff({"a": [{"ok": 1}]}, {"a": [{"ok": True}]}) == {"~": {"a": {"=": [{"ok": True}]}}}  # deep down too
    assert diff([[0]], [[False]]) == {"=": [[False]]} and diff({"a": 1.0}, {"a": 1}) is None
