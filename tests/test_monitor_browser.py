"""The dashboard in a real headless Chromium: the page loads, says it is live, and shows a value appended to the
metrics stream after it opened; a realistic run renders every panel (and, with PILLSNAP_DASHBOARD_SCREENSHOT=path,
is saved as the screenshot in docs/)."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000  # generous: two shared cores

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def append(path: Path, *records: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


@pytest.fixture
def dashboard(tmp_path):
    """A dashboard server on a free port, in a thread, following tmp_path/exp (which has no stream yet)."""
    import uvicorn

    from pillsnap.monitor.dashboard import create_dashboard

    exp = tmp_path / "stage3"
    exp.mkdir()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_dashboard(exp, poll_s=0.2), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the dashboard server did not start"
    yield exp, f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1600, "height": 1000})
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda err: errors.append(f"{err}\n{err.stack}"))
        yield tab
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_page_connects_and_shows_an_appended_value(dashboard, page):
    exp, url = dashboard
    page.goto(url)
    page.wait_for_function("document.querySelector('#connection').dataset.state === 'live'", timeout=WAIT_MS)
    assert "live" in page.inner_text("#connection")
    assert "Waiting for the first step" in page.inner_text("#empty-run")
    assert page.is_visible("#stream-missing")  # the stream does not exist yet, and the page says so

    stream = exp / "reports" / "metrics.jsonl"
    now = time.time()
    append(stream, {"type": "start", "time": now, "tasks": ["classification"], "epochs": 3, "stage": 2,
                    "start_epoch": 0},
           {"type": "step", "time": now + 1, "task": "classification", "epoch": 1, "max_epochs": 3, "step": 4,
            "steps": 10, "global_step": 4, "loss": 0.87654, "lr": 1e-3, "n": 8, "data_time": 0.01,
            "compute_time": 0.09, "throughput": 80.0, "cuda_mem": 0.0})
    page.wait_for_function("document.querySelector('#kpi-classification-loss')?.textContent === '0.8765'",
                           timeout=WAIT_MS)
    assert page.inner_text("#run-stage") == "Stage 2"
    assert page.inner_text("#run-status").lower() == "running"
    assert "epoch 1 / 3" in page.inner_text("#task-classification .task-where")

    append(stream, {"type": "val", "time": now + 2, "task": "classification", "epoch": 1, "val_loss": 0.5,
                    "acc": 0.6789, "macro_f1": 0.61, "top5": 0.95, "n": 16})
    page.wait_for_function("document.querySelector('#kpi-classification-acc')?.textContent === '67.9 %'",
                           timeout=WAIT_MS)
    append(stream, {"type": "stage_evaluation", "time": now + 3, "stage": 2, "status": "NO_GO",
                    "recommendation": "SUGGEST_OPTIMIZE", "action": "optimise and retrain stage 2: raise train.epochs",
                    "reasons": ["ACC_BELOW_TARGET: classification.acc 0.68 (target >= 0.82)"],
                    "suggestions": ["raise train.epochs"],
                    "not_comparable": [{"path": "latency_p95_ms", "value": 806.0, "threshold": 220,
                                        "target_device": "cuda", "device": "cpu"}]})
    page.wait_for_function("document.querySelector('#gonogo').textContent === 'NO-GO'", timeout=WAIT_MS)
    shown = page.inner_text("#evaluation")
    assert "ACC_BELOW_TARGET: classification.acc 0.68 (target >= 0.82)" in shown
    # One verdict: the badge, the recommendation under it and the next step agree.
    assert page.inner_text("#gonogo-sub") == "suggest optimize"
    assert "Next step: optimise and retrain stage 2: raise train.epochs" in shown
    assert "latency_p95_ms 806 on cpu (the target 220 is for cuda)" in shown


def as_json(value: object) -> object:
    """`value` compared as JSON compares: 1 and 1.0 alike (JavaScript writes 1.0 as 1), 1 and true not."""
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    if isinstance(value, bool):
        return ("bool", value)
    return float(value) if isinstance(value, (int, float)) else value


def test_the_page_built_from_patches_holds_the_servers_state(dashboard, page):
    """After its first state the page is sent only what changed (pillsnap/monitor/delta.py) and patches the state
    it holds: after a run's records came in bursts (its charts thinned to half their rows on the way, a stage
    evaluation and a resume among them), what the page holds is the server's state, value for value."""
    import urllib.request

    exp, url = dashboard
    stream = exp / "reports" / "metrics.jsonl"
    records = synthetic_run(time.time(), epochs=12, done_epochs=11.5, stage=2)
    append(stream, *records[:50])
    page.goto(url)
    page.wait_for_function("document.querySelector('#connection').dataset.state === 'live'", timeout=WAIT_MS)
    resume = {**records[0], "type": "start", "start_epoch": 6, "time": records[len(records) // 2]["time"]}
    bursts = [records[50:400], records[400:len(records) // 2], [resume], records[len(records) // 2:]]
    for burst in bursts:
        append(stream, *burst)
        count = sum(len(b) for b in bursts[:bursts.index(burst) + 1]) + 50
        page.wait_for_function(f"page.state && page.state.records === {count}", timeout=WAIT_MS)
    append(stream, {"type": "stage_evaluation", "time": time.time(), "stage": 2, "status": "GO",
                    "recommendation": "PROCEED"})
    page.wait_for_function("document.querySelector('#gonogo').textContent === 'GO'", timeout=WAIT_MS)
    # an evaluation file holds any JSON: a value turning from 1 to true, a key named __proto__ coming in
    evaluation = exp / "reports" / "stage_2_evaluation.json"
    for details in ({"flags": [1]}, {"flags": [True], "__proto__": {"polluted": 1}}):
        evaluation.write_text(json.dumps({"stage": 2, "status": "GO", "recommendation": "PROCEED",
                                          "details": details}), encoding="utf-8")
        want = json.dumps(details["flags"][0])
        page.wait_for_function(f"page.state.evaluation?.details?.flags?.[0] === {want}", timeout=WAIT_MS)
    assert page.evaluate("page.state.evaluation.details.polluted") is None  # a key, not the prototype
    with urllib.request.urlopen(url + "api/state") as response:
        server = json.loads(response.read())
    held = json.loads(page.evaluate("JSON.stringify(page.state)"))  # as text: playwright drops a __proto__ key
    for state in (server, held):
        state.pop("server_time")
    assert as_json(held) == as_json(server)
    steps = sum(r["type"] == "step" and r.get("task") == "classification" for r in records)
    assert len(held["tasks"]["classification"]["train"]["x"]) < steps  # thinned on the way


def test_page_survives_the_stream_being_replaced(dashboard, page):
    exp, url = dashboard
    stream = exp / "reports" / "metrics.jsonl"
    append(stream, *synthetic_run(time.time() - 600, epochs=4, done_epochs=1.5, stage=1))
    page.goto(url)
    page.wait_for_selector("#task-detection", timeout=WAIT_MS)
    replacement = stream.with_suffix(".new")
    append(replacement, {"type": "start", "time": time.time(), "tasks": ["classification"], "epochs": 2,
                         "stage": 4, "start_epoch": 0})
    os.replace(replacement, stream)  # a new run's file, smaller than what the page had read
    page.wait_for_function("document.querySelector('#run-stage').textContent === 'Stage 4'", timeout=WAIT_MS)
    page.wait_for_selector("#task-detection", state="detached", timeout=WAIT_MS)


def test_elapsed_after_a_resume_is_the_stage_clock(dashboard, page):
    """A run resumed 10 minutes ago after 2 hours of earlier runs: Elapsed reads the stage's 2 h 10 m, which the
    time cap counts, not the resumed run's 10 minutes."""
    exp, url = dashboard
    now = time.time()
    first = synthetic_run(now - 9000, epochs=4, done_epochs=1.5, stage=3)
    first[0]["elapsed_s"] = 12.0  # a fresh run's start record: its own set-up time on the clock, nothing before it
    append(exp / "reports" / "metrics.jsonl", *first)
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-started').textContent.startsWith('started ')",
                           timeout=WAIT_MS)
    resumed = {"type": "start", "time": now - 600, "tasks": ["classification", "detection"], "epochs": 4,
               "stage": 3, "start_epoch": 1, "elapsed_s": 7200.0}
    append(exp / "reports" / "metrics.jsonl", resumed,
           {**next(r for r in reversed(first) if r["type"] == "step"), "time": now - 5, "epoch": 2})
    page.wait_for_function("document.querySelector('#run-resumes').textContent.startsWith('resumed')",
                           timeout=WAIT_MS)
    assert page.inner_text("#run-elapsed") == "2 h 10 m"
    assert page.inner_text("#run-started").startswith("resumed ") and page.inner_text("#run-started").endswith(
        " at 2 h 00 m on the stage's clock")


def test_a_crashed_run_is_shown_as_crashed_with_no_decision_pending(dashboard, page):
    """A run whose end record says "crashed": a red badge, and no stage decision said to be on its way (before,
    "Pending ... when the stage run ends" for a run that had ended)."""
    exp, url = dashboard
    now = time.time()
    records = synthetic_run(now - 600, epochs=4, done_epochs=2, stage=1)
    append(exp / "reports" / "metrics.jsonl", *records, {"type": "end", "time": now - 60, "status": "crashed",
                                                         "epoch": 2})
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-status').textContent === 'crashed'", timeout=WAIT_MS)
    assert "crashed" in page.get_attribute("#run-status", "class")
    assert page.inner_text("#gonogo").lower() == "none"
    assert page.inner_text("#evaluation").startswith("No decision: the run stopped before its end.")


def test_page_tells_a_quiet_trainer_from_one_that_is_gone(dashboard, page):
    """Three minutes without a record: with the trainer's process alive (a long validation, a checkpoint) the page
    says so instead of asking; once the process that held the folder has ended without an end record (a kill, a
    crash), the run is "stopped", not "running", and its ETA stops counting down."""
    import socket
    import subprocess
    import sys

    exp, url = dashboard
    append(exp / "reports" / "metrics.jsonl", *synthetic_run(time.time() - 180, epochs=4, done_epochs=1.5, stage=3))
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "role": "train", "since": "now",
              "since_unix": time.time(), "command": "pillsnap train --cfg config.yaml"}
    (exp / "run.lock").write_text(json.dumps(holder), encoding="utf-8")
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-updated').textContent.includes('trainer alive')",
                           timeout=WAIT_MS)
    assert page.inner_text("#run-updated").startswith("quiet for 3 m")
    assert page.inner_text("#run-status").lower() == "running" and not page.is_visible("#run-alert")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (exp / "run.lock").write_text(json.dumps({**holder, "pid": int(dead.stdout)}), encoding="utf-8")  # killed
    page.wait_for_function("document.querySelector('#run-status').textContent === 'stopped'", timeout=WAIT_MS)
    alert = page.inner_text("#run-alert")
    assert f"The trainer (pid {dead.stdout.strip()} on {socket.gethostname()}: pillsnap train --cfg config.yaml) " \
           "has ended without an end record: it was killed or crashed" in alert and "train.resume=last" in alert
    assert "ETA" not in page.inner_text("#task-classification .task-eta")
    if os.environ.get("PILLSNAP_DASHBOARD_GONE_SCREENSHOT"):
        page.screenshot(path=os.environ["PILLSNAP_DASHBOARD_GONE_SCREENSHOT"], full_page=False)


def test_a_trainer_gone_with_torchrun_restarts_left_is_a_restart_that_may_come(dashboard, page):
    """Under NCCL an OOM on another rank ends rank 0 without an end record (it waits in a collective until torchrun
    kills it), and torchrun starts the job again: the page said "stopped" and --terminal quit meanwhile."""
    import socket
    import subprocess
    import sys

    exp, url = dashboard
    records = synthetic_run(time.time() - 20, epochs=4, done_epochs=1.5, stage=3)
    records[0].update(world_size=2, max_restarts=1)
    append(exp / "reports" / "metrics.jsonl", *records)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (exp / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "role": "train",
                                              "since": "now", "since_unix": time.time(),
                                              "command": "torchrun ..."}), encoding="utf-8")
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-status').textContent === 'restarting?'", timeout=WAIT_MS)
    assert "torchrun has restarts left (1 of 1)" in page.inner_text("#run-alert")
    restart = {**records[0], "time": time.time(), "start_epoch": 1, "restart": 1}
    append(exp / "reports" / "metrics.jsonl", restart, {**records[-1], "time": time.time()})
    (exp / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "role": "train",
                                              "since": "now", "since_unix": time.time(),
                                              "command": "torchrun ..."}), encoding="utf-8")
    page.wait_for_function("document.querySelector('#run-status').textContent === 'running'", timeout=WAIT_MS)
    assert not page.is_visible("#run-alert")


def test_page_asks_whether_a_trainer_alive_but_silent_for_an_hour_hangs(dashboard, page):
    import socket

    exp, url = dashboard
    append(exp / "reports" / "metrics.jsonl", *synthetic_run(time.time() - 3700, epochs=4, done_epochs=1.5, stage=4))
    (exp / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "role": "train",
                                              "since_unix": time.time(), "command": "pillsnap train"}))
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-updated').textContent.includes('hung?')", timeout=WAIT_MS)
    assert page.inner_text("#run-updated").startswith("quiet for 1 h 01 m")
    assert "warn" in page.get_attribute("#run-updated", "class")


def test_realistic_run_renders_every_panel(dashboard, page, tmp_path):
    exp, url = dashboard
    append(exp / "reports" / "metrics.jsonl", *synthetic_run(time.time(), epochs=18, done_epochs=8.45, stage=3))
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('.task').length === 2", timeout=WAIT_MS)
    page.wait_for_function("document.querySelector('#system .meter') !== null", timeout=WAIT_MS)
    assert page.inner_text("#run-epoch") == "9 / 18"
    assert " · cap in 6 h " in page.inner_text("#run-finish")  # stage 3's 8 h, an hour and some spent
    assert page.inner_text("#oom-count") == "1"
    assert "micro-batching" in page.inner_text("#oom")
    for task in ("classification", "detection"):
        # five charts, each with axes labelled and at least one drawn line
        assert page.locator(f"#task-{task} .chart svg path").count() >= 5
        labels = page.locator(f"#task-{task} .axis text.label").all_text_contents()
        assert labels.count("epoch") == 5 and "loss" in labels and "images / s" in labels
    assert "%" in page.inner_text("#kpi-detection-mAP-0-5")
    loss_chart = page.locator('#task-classification [data-chart="loss"]')
    loss_chart.locator("svg").hover()  # the read-out names the epoch and each line's value there
    assert loss_chart.locator(".tip").is_visible() and "epoch" in loss_chart.locator(".tip").inner_text()
    loss_chart.locator("button.toggle").click()
    assert "loss (log)" in loss_chart.locator(".axis text.label").all_text_contents()
    page.mouse.move(0, 0)
    loss_chart.locator("button.toggle").click()
    target = os.environ.get("PILLSNAP_DASHBOARD_SCREENSHOT") or str(tmp_path / "dashboard.png")
    page.wait_for_timeout(500)  # let the bars' width transition finish
    page.screenshot(path=target, full_page=True)
    assert Path(target).stat().st_size > 50_000


def test_an_eta_past_the_stages_time_cap_is_flagged(dashboard, page, tmp_path):
    """A run that will not finish within its stage's cap says so beside the ETA, from the start record's cap, not
    only in the verdict after the cap has stopped it."""
    exp, url = dashboard
    records = synthetic_run(time.time(), epochs=18, done_epochs=8.45, stage=3)
    records[0]["time_limit_hours"] = 1.5  # about 65 min spent, about 70 to go
    append(exp / "reports" / "metrics.jsonl", *records)
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-finish').textContent.includes('cap')", timeout=WAIT_MS)
    finish = page.locator("#run-finish")
    assert finish.inner_text().startswith("cap (1 h 30 m) ends it in ")
    assert "warn" in (finish.get_attribute("class") or "")
    page.screenshot(path=str(os.environ.get("PILLSNAP_CAP_SCREENSHOT") or tmp_path / "cap.png"))


def test_the_work_after_training_shows_on_the_go_no_go_card(dashboard, page):
    """Training ended; the calibration is under way (hours at Stage 4): the card names it instead of "decided when
    the stage run ends"."""
    exp, url = dashboard
    records = synthetic_run(time.time() - 60, epochs=2, done_epochs=2, stage=4)
    records += [{"type": "end", "time": time.time() - 50, "status": "completed"},
                {"type": "after_training", "time": time.time() - 40, "step": "calibration", "event": "start"}]
    append(exp / "reports" / "metrics.jsonl", *records)
    page.goto(url)
    page.wait_for_function("document.querySelector('#gonogo-sub').textContent.includes('after training')",
                           timeout=WAIT_MS)
    assert page.inner_text("#gonogo-sub") == "after training: calibration" and page.inner_text("#gonogo") == "PENDING"
    assert "calibration is under way since" in page.inner_text("#evaluation")


def test_a_step_of_the_work_after_training_that_failed_stays_on_the_card_beside_the_verdict(dashboard, page):
    """The report plots failed, the stage evaluation went on and decided: the card gives the verdict and says what
    is still to finish (the step under way, the only thing shown before, was the evaluation, done)."""
    exp, url = dashboard
    now = time.time()
    records = synthetic_run(now - 60, epochs=2, done_epochs=2, stage=1)
    records += [{"type": "end", "time": now - 50, "status": "completed"},
                *({"type": "after_training", "time": now - 45 + i, "step": step, "event": event}
                  for i, (step, event) in enumerate([("calibration", "start"), ("calibration", "done"),
                                                     ("reports", "start"), ("reports", "failed"),
                                                     ("stage_evaluation", "start"), ("stage_evaluation", "done")])),
                {"type": "stage_evaluation", "time": now - 30, "stage": 1, "status": "GO",
                 "recommendation": "PROCEED", "action": "train stage 2"}]
    append(exp / "reports" / "metrics.jsonl", *records)
    page.goto(url)
    page.wait_for_function("document.querySelector('#gonogo').textContent === 'GO'", timeout=WAIT_MS)
    assert "The work after training failed at the validation reports" in page.inner_text("#evaluation")


def test_an_eight_rank_job_shows_the_jobs_throughput_and_torchruns_restart(dashboard, page, tmp_path):
    """The step records are rank 0's: the page showed one GPU's images a second as the run's. An OOM under
    torchrun --max-restarts ends the processes, which torchrun starts again: the page said "OOM exit"."""
    exp, url = dashboard
    now = time.time()
    records = synthetic_run(now - 60, epochs=4, done_epochs=1.5, stage=3)
    shift = now - 60 - records[-1]["time"]
    for record in records:
        record["time"] += shift
    records[0].update(world_size=8, max_restarts=2)
    rank0 = next(r for r in reversed(records) if r["type"] == "step" and r["task"] == "classification")
    append(exp / "reports" / "metrics.jsonl", *records,
           {"type": "end", "time": now - 50, "status": "oom_emergency_exit"})
    page.goto(url)
    page.wait_for_function("document.querySelector('#run-status').textContent === 'restarting'", timeout=WAIT_MS)
    assert "torchrun starts the job again by itself (restart 1 of 2)" in page.inner_text("#run-alert")
    assert "with the recovery the OOM saved" in page.inner_text("#run-alert")
    kpi = page.inner_text("#kpi-classification-throughput").replace(",", "").removesuffix("img/s")
    assert float(kpi) == pytest.approx(8 * rank0["throughput"], rel=0.01)
    page.screenshot(path=str(tmp_path / "restarting.png"), full_page=True)


# ---------- a realistic synthetic stream (a Stage-3-like GPU run), as the trainer writes it ----------

def lr_at(progress: float, epochs: int, base: float, warmup: float = 0.5) -> float:
    if progress < warmup:
        return base * progress / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (epochs - warmup)))


def step_record(task: str, t: float, epoch: int, step: int, steps: int, gstep: int, epochs: int,
                rng: random.Random) -> dict:
    p = epoch - 1 + step / steps
    if task == "classification":
        loss = 0.55 + 6.3 * math.exp(-p / 1.6) + rng.gauss(0, 0.09)
        thr, mem, base_lr, n = rng.gauss(372, 9), 14_820 + rng.gauss(0, 40), 2e-3, 128
    else:
        loss = 1.7 + 3.1 * math.exp(-p / 2.5) + rng.gauss(0, 0.12)
        thr, mem, base_lr, n = rng.gauss(46, 2.5), 19_400 + rng.gauss(0, 60), 1e-3, 16
    data = max(0.002, rng.gauss(0.018, 0.004)) + (0.09 if rng.random() < 0.04 else 0.0)
    return {"type": "step", "time": round(t, 3), "task": task, "epoch": epoch, "max_epochs": epochs, "step": step,
            "steps": steps, "global_step": gstep, "loss": loss, "lr": lr_at(p, epochs, base_lr), "n": n,
            "data_time": data, "compute_time": n / thr - data * 0.2, "throughput": thr, "cuda_mem": mem}


def val_records(t: float, epoch: int, rng: random.Random) -> list[dict]:
    acc = 0.86 - 0.7 * math.exp(-epoch / 2.8) + rng.gauss(0, 0.008)
    m50 = 0.52 - 0.48 * math.exp(-epoch / 3.5) + rng.gauss(0, 0.01)
    return [{"type": "val", "time": round(t, 3), "task": "classification", "epoch": epoch,
             "val_loss": 0.45 + 2.6 * math.exp(-epoch / 2.0), "acc": acc, "macro_f1": acc - 0.035,
             "top1": acc, "top5": min(0.995, acc + 0.1), "confidence": acc - 0.05, "n": 18525},
            {"type": "val", "time": round(t + 40, 3), "task": "detection", "epoch": epoch, "mAP@0.5": m50,
             "mAP@0.5:0.95": m50 * 0.62, "precision": m50 + 0.18, "recall": m50 + 0.08, "num_images": 926}]


def synthetic_run(end: float, epochs: int, done_epochs: float, stage: int, log_every: int = 10) -> list[dict]:
    """An interleaved classification + detection run (one detection step after every fourth classification step),
    logged every `log_every` steps of each task, with one OOM recovery, cut off `done_epochs` into `epochs`; its
    last record is at time `end`."""
    rng = random.Random(0)
    cls_steps, det_steps, step_s, val_s = 637, 160, 0.36, 95
    records: list[dict] = [{"type": "start", "time": 0.0, "tasks": ["classification", "detection"],
                            "epochs": epochs, "stage": stage, "start_epoch": 0,
                            "time_limit_hours": {1: 0.5, 2: 2.0, 3: 8.0, 4: 48.0}[stage]}]
    t, gstep = 30.0, 0
    for epoch in range(1, int(done_epochs) + 2):
        for i in range(1, cls_steps + 1):
            if epoch - 1 + i / cls_steps > done_epochs:
                break
            t += step_s
            gstep += 1
            if i % log_every == 0:
                records.append(step_record("classification", t, epoch, i, cls_steps, gstep, epochs, rng))
            if i % 4 == 0 and i // 4 <= det_steps:
                t += step_s * 2.4
                gstep += 1
                if (i // 4) % log_every == 0:
                    records.append(step_record("detection", t, epoch, i // 4, det_steps, gstep, epochs, rng))
            if epoch == 3 and i == 200:
                records.append({"type": "oom", "time": t, "task": "detection", "retries": 1, "global_step": gstep,
                                "action": "microbatching",
                                "state": {"batch_size": 8, "grad_accum": 2, "did_amp_escalate": True}})
        else:
            records += val_records(t + 5, epoch, rng)
            t += val_s
            records.append({"type": "epoch", "time": t, "epoch": epoch})
    shift = end - t
    return [{**r, "time": round(r["time"] + shift, 3)} for r in records]


def test_synthetic_run_is_what_the_trainer_writes():
    records = synthetic_run(1000.0, epochs=3, done_epochs=3, stage=1)
    assert records[-1]["time"] == pytest.approx(1000.0) and records[0]["type"] == "start"
    assert {r["type"] for r in records} == {"start", "step", "val", "epoch", "oom"}
    assert all(r1["time"] <= r2["time"] for r1, r2 in zip(records, records[1:], strict=False) if r2["type"] == "step")
