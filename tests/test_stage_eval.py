"""The end-of-stage evaluation: on real run outputs (a short interleaved run on the synthetic fixture whose detector
finds nothing yet, a regression against the previous evaluation, the time-cap rule, the user's choice), and its
measuring parts on their own (memory bounded whatever the split's size, the run's figures, refusals)."""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH_CLASSES
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pillsnap.config import load_config
from pillsnap.eval import stage_measure
from pillsnap.eval.latency import SAMPLES, loader_items, measure, take
from pillsnap.eval.stage_eval import choose, evaluate_stage, evaluation_device, finished_line
from pillsnap.train import train


def run_cfg(synth_root: Path, manifest_dir: Path, exp: Path, *extra: str):
    return load_config(None, overrides=[
        f"paths.data_root={synth_root}", f"paths.manifest_dir={manifest_dir}", f"paths.exp_dir={exp}",
        f"paths.cache_dir={exp.parent / 'cache'}", "model.backbone=test_efficientnet", "model.image_size=32",
        "model.detector=yolo11n", "model.det_image_size=64", "train.batch_size=4", "train.detection.batch_size=2",
        "train.epochs=1", "train.max_steps_per_epoch=2", "dataloader.num_workers=0",
        "dataloader.persistent_workers=false", "dataloader.pin_memory=false",
        "data.progressive_validation.stage_1.max_samples=1000",
        f"data.progressive_validation.stage_1.max_classes={SYNTH_CLASSES}", *extra], dotenv_path=None)


@pytest.fixture(scope="module")
def trained(synth_root, manifest_dir, tmp_path_factory) -> tuple:
    """One short interleaved run whose end-of-run stage evaluation ran (with --yes)."""
    exp = tmp_path_factory.mktemp("stage_run") / "exp"
    cfg = run_cfg(synth_root, manifest_dir, exp)
    assert train(cfg, assume_yes=True) == 0
    return cfg, exp


def copy_run(trained: tuple, tmp_path: Path):
    cfg, exp = trained
    dst = tmp_path / "exp"
    shutil.copytree(exp, dst)
    cfg = cfg.copy()
    cfg.paths.exp_dir = str(dst)
    return cfg, dst


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_the_end_of_run_evaluation_measures_decides_and_reports(trained):
    cfg, exp = trained
    report = json.loads((exp / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    results = report["results"]
    # Measured now, not read from a constant: latencies, loading, export, per-class floors.
    assert results["classification"]["inference_time_ms"] > 0 and results["detection"]["inference_time_ms"] > 0
    assert 0 < results["latency_p95_ms"] < 60_000 and results["production"]["inference_latency_ms"] > 0
    assert results["mandatory_checks"] == {"pipeline_complete": True, "detection_model_loading": True,
                                           "classification_model_loading": True, "onnx_conversion_success": True}
    assert results["n_eval_samples"] > 0 and 0 < results["class_coverage"] <= 1
    assert results["optimization"]["throughput_img_s"] > 0 and results["system"]["gpu_memory_gb"] is None  # CPU
    # Measured on the run's device (the CPU here): GPU latency targets are reported, not held against the stage.
    assert results["device"] == "cpu" and results["latency"]["pipeline"]["device"] == "cpu"
    assert {n["path"] for n in report["not_comparable"]} >= {"latency_p95_ms", "classification.inference_time_ms",
                                                             "detection.inference_time_ms"}
    assert not any(r.startswith("LATENCY_P95_TOO_HIGH") for r in report["reasons"])
    # Every crop of the (small) split evaluated: the sample floor is met; the latency sample stays bounded.
    assert results["n_eval_samples"] == results["n_eval_available"] > 0
    assert "NOT_ENOUGH_SAMPLES" not in report["go_no_go"]["reasons"]
    assert results["latency"]["classification"]["samples"] <= SAMPLES
    # The tiny detector finds nothing: the stage must not proceed, and the one verdict says why and what next.
    assert results["detection"]["mAP@0.5"] < 0.05
    assert report["status"] == "NO_GO" and report["recommendation"] == report["advisor"]["recommendation"] \
        == "WARN_STOP"
    assert any(r.startswith("TARGET_NOT_MET: detection.mAP@0.5") for r in report["reasons"])
    # the suite is offline: both models asked for pretrained weights and started from random ones, which the
    # next step names before the detector's own knobs
    assert set(results["init_weights"]) == {"classification", "detection"}
    assert "trained from random weights" in report["action"]
    assert any("train.detection" in tip for tip in report["suggestions"])
    assert report["choice"] == {"option": 1, "text": report["advisor"]["user_options"][0], "how": "--yes"}
    # the design's advisor keys: its colour and message, and the user's choice as the option typed
    assert (report["advisor"]["color"], report["advisor"]["message"]) == ("🔴", "Stage 1: performance very low")
    assert report["user_choice"] == "1"
    streamed = [r for r in read_jsonl(exp / "reports" / "metrics.jsonl") if r["type"] == "stage_evaluation"]
    assert streamed[-1]["status"] == "NO_GO" and streamed[-1]["reasons"] == report["reasons"]
    assert streamed[-1]["action"] == report["action"] and streamed[-1]["choice"] == report["choice"]
    # The run's own log holds the decision (training's handlers are gone by the time the evaluation runs).
    log = (exp / "logs" / "pillsnap.log").read_text(encoding="utf-8")
    assert "stage 1 decision NO_GO (WARN_STOP); next step: " in log and "calibration: temperature" in log
    assert finished_line(exp, 1).startswith("training finished; stage 1 decision NO_GO (WARN_STOP); next step: ")
    assert (exp / "checkpoints" / "stage1_classification_best.pt").samefile(
        exp / "checkpoints" / "classification_best.pt")
    assert (exp / "checkpoints" / "stage1_detection_best.pt").is_file()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_a_regression_against_the_previous_evaluation_is_named(trained, tmp_path):
    cfg, exp = copy_run(trained, tmp_path)
    path = exp / "reports" / "stage_1_evaluation.json"
    previous = json.loads(path.read_text(encoding="utf-8"))
    acc = previous["results"]["classification"]["acc"]
    previous["results"]["classification"]["acc"] = acc + 0.10  # the last evaluation of this stage was better...
    previous["classifier_sha256"] = "0" * 64  # ... and of other weights
    path.write_text(json.dumps(previous), encoding="utf-8")
    # a last epoch unlike the best checkpoint's (as after an early stop): the gate reads the best checkpoint's epoch
    metrics_path = exp / "reports" / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    metrics["classification"]["acc"] = 0.123
    metrics_path.write_text(json.dumps(metrics), encoding="utf-8")
    report = evaluate_stage(cfg, exp, choice=2)
    assert report["results"]["classification"]["acc"] == pytest.approx(acc) != 0.123
    assert "REGRESSION_TOO_LARGE" in report["go_no_go"]["reasons"] and report["go_no_go"]["go"] is False
    assert any(r.startswith("REGRESSION_TOO_LARGE: classification.acc ") for r in report["reasons"])
    # the baseline keeps the split it measured: the same weights evaluated again keep it only on that split
    assert report["baseline"] == {"classification.acc": pytest.approx(acc + 0.10),
                                  "n_eval_available": report["results"]["n_eval_available"]}
    assert report["choice"]["option"] == 2 and report["choice"]["how"] == "--choice" and report["user_choice"] == "2"
    # `pillsnap evaluate` again on the same weights: judged against the same baseline, not against itself
    again = evaluate_stage(cfg, exp, choice=2)
    assert again["classifier_sha256"] == report["classifier_sha256"] != "0" * 64
    assert again["baseline"] == report["baseline"] and "REGRESSION_TOO_LARGE" in again["go_no_go"]["reasons"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_the_evaluate_command_never_blocks_without_a_terminal(trained, tmp_path, capsys):
    from pillsnap.cli import main

    _, exp = copy_run(trained, tmp_path)
    assert main(["evaluate", "--exp", str(exp), "--stage", "1"]) == 0
    out = capsys.readouterr().out
    assert "Stage 1 evaluation: NO_GO — WARN_STOP" in out and "chosen: [1]" in out
    assert out.strip().splitlines()[-1].startswith("stage 1 decision NO_GO (WARN_STOP); next step: ")
    report = json.loads((exp / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    assert report["choice"]["how"].startswith("default (")  # pytest's stdin is no terminal (and CI sets CI)
    assert main(["evaluate", "--exp", str(tmp_path / "nothing"), "--stage", "1"]) == 2


def test_choices_asked_given_or_defaulted():
    decision = {"advisor": {"user_options": ["[1] a", "[2] b", "[3] c"]}}
    answers = iter(["x", "3"])
    assert choose(decision, ask=lambda _prompt: next(answers)) == {"option": 3, "text": "[3] c", "how": "asked"}
    assert choose(decision, ask=lambda _prompt: "")["option"] == 1  # Enter takes the first option
    assert choose(decision, choice=2)["how"] == "--choice" and choose(decision, assume_yes=True)["option"] == 1
    with pytest.raises(ValueError, match="between 1 and 3"):
        choose(decision, choice=4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_a_time_capped_stage_1_that_meets_the_rule_is_go(synth_root, manifest_dir, tmp_path):
    pv = "data.progressive_validation.stage_1."
    cfg = run_cfg(synth_root, manifest_dir, tmp_path / "exp", "train.epochs=3", f"{pv}time_limit_hours=1.0e-9",
                  f"{pv}min_samples_required=4", f"{pv}min_class_coverage=1", "train.strategy=classification")
    assert train(cfg, assume_yes=True) == 0
    report = json.loads((tmp_path / "exp" / "reports" / "stage_1_evaluation.json").read_text(encoding="utf-8"))
    assert report["results"]["run_status"] == "time_capped" and report["results"]["time_cap"]["success"]
    assert report["status"] == "GO" and "time cap" in report["rule"] and report["recommendation"] == "RECOMMEND_PROCEED"
    assert "ACC_BELOW_TARGET" in report["go_no_go"]["reasons"]  # the shortfalls are still on record


# ---- the measuring parts on their own (fast) -------------------------------------------------------------------------
class CountingCrops(Dataset):
    """Validation crops that count their decodes; numpy-backed, so tracemalloc sees every crop held in memory."""

    def __init__(self, n: int) -> None:
        self.n, self.decoded = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        self.decoded += 1
        return np.full((3, 16, 16), i % 7, np.float32), i % 4


def crop_batch(items: list) -> tuple:
    return torch.from_numpy(np.stack([x for x, _ in items])), torch.tensor([y for _, y in items])


def classifier_pass(n: int) -> tuple[int, CountingCrops, dict]:
    """Peak traced memory, the data set and the figures of the classifier measurement over n validation crops."""
    import tracemalloc

    data = CountingCrops(n)
    loaders = types.SimpleNamespace(cls_val=DataLoader(data, batch_size=8, collate_fn=crop_batch),
                                    meta={"num_classes": 4})
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    tracemalloc.start()
    try:
        figures = stage_measure.classifier_figures(model, loaders, "cpu")
        return tracemalloc.get_traced_memory()[1], data, figures
    finally:
        tracemalloc.stop()


def test_the_evaluation_memory_does_not_grow_with_the_split():
    import sklearn.metrics  # noqa: F401  (imported untraced: tracing an import is slow)

    classifier_pass(16)  # first-use allocations out of the way
    small_peak, small, _ = classifier_pass(100)
    big_peak, big, figures = classifier_pass(1000)
    # The per-class figures cover the whole split, one batch at a time; the latency sample is bounded.
    assert figures["n_eval_samples"] == figures["n_eval_available"] == 1000
    assert figures["latency"].samples == SAMPLES and figures["latency"].device == "cpu"
    assert big.decoded - 1000 <= SAMPLES + 8 and small.decoded - 100 <= SAMPLES + 8
    # Holding the crops would cost 3 KiB per row (the old evaluation held every one); labels and predictions cost
    # a few bytes.
    per_row = (big_peak - small_peak) / 900
    assert per_row < 0.1 * 3 * 16 * 16 * 4, per_row


def test_a_latency_sample_reads_only_what_it_takes_and_keeps_the_median(monkeypatch):
    from pillsnap.eval import latency

    data = CountingCrops(10_000)
    loader = DataLoader(data, batch_size=8, collate_fn=crop_batch)
    sample = take(loader_items(loader, lambda batch: batch[0]), 20)
    assert len(sample) == 20 and data.decoded == 24  # three batches of eight, nothing more
    # A fake clock: three warm-up calls, then three passes over three inputs; a neighbour slows one call of the
    # first pass 250-fold. Each input keeps its median, so that call moves nothing.
    durations = iter([9.0] * 3 + [0.001, 0.002, 0.5] + [0.001, 0.002, 0.003] * 2)
    now = [0.0]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: now[0])

    def call(_item: int) -> None:
        now[0] += next(durations)

    figure = measure(call, [1, 2, 3], "cpu", repeats=(3, 3))
    assert figure is not None and (figure.samples, figure.repeats) == (3, 3)
    assert figure.median_ms == pytest.approx(2.0) and figure.p95_ms == pytest.approx(2.9)
    assert measure(call, [], "cpu") is None


def test_the_runs_figures_include_the_advanced_metrics():
    steps = [{"type": "step", "task": "classification", "epoch": e, "loss": loss, "cuda_mem": mem, "data_time": 0.1,
              "throughput": 50.0} for e, loss, mem in [(1, 3.0, 1000), (2, 1.0, 1000), (2, 1.2, 1000), (2, 0.8, 2000)]]
    summary = {"history": [{"rss_mb": 100}, {"rss_mb": 104}, {"rss_mb": 105}],
               "system": {"device": "cuda:0", "peak_cuda_mem_mb": 2048},
               "batch": {"classification": {"batch_size": 16, "grad_accum": 2, "samples_seen": 64}}}
    run = stage_measure.run_figures(summary, steps)
    assert run["loss_variance"] == pytest.approx(np.var([1.0, 1.2, 0.8]))  # the last epoch only
    assert run["memory_peak_over_avg"] == pytest.approx(2000 / 1250)
    assert run["global_batch"] == 32 and run["gpu_memory_gb"] == 2.0 and run["memory_stable"]
    on_4_gpus = {**summary, "batch": {"classification": {"batch_size": 16, "grad_accum": 2, "world_size": 4}}}
    assert stage_measure.run_figures(on_4_gpus, steps)["global_batch"] == 128  # every rank's
    assert stage_measure.run_figures(on_4_gpus, steps)["rank_batch"] == 32
    on_cpu = stage_measure.run_figures({**summary, "system": {"device": "cpu"}},
                                       [{**r, "cuda_mem": 0.0} for r in steps])
    assert on_cpu["memory_peak_over_avg"] == pytest.approx(105 / np.mean([100, 104, 105]))
    assert not run["nan_loss"] and run["skipped_steps"] == 0
    # a NaN step between two logged steps is skipped (the weights and the logged losses stay finite), but its
    # epoch's mean training loss is NaN: the gate still sees it
    history = [{"classification": {"train_loss": 2.0, "skipped_steps": 0}},
               {"classification": {"train_loss": float("nan"), "skipped_steps": 1},
                "detection": {"train_loss": 3.0, "skipped_steps": 2}},
               {"classification": {"train_loss": 1.5, "skipped_steps": 1}}]  # the detector stopped early
    skipped = stage_measure.run_figures({**summary, "history": history}, steps)
    assert skipped["nan_loss"] and skipped["skipped_steps"] == 3


def test_the_runs_figures_are_of_this_run_not_of_earlier_runs_in_the_folder(tmp_path):
    """A fresh run appends to the metrics.jsonl of the runs before it in the folder: their NaN loss, OOMs and
    throughput are not this run's (they made a clean run NO_GO on NAN_LOSS); a resume's records are."""
    def step(loss, throughput):
        return {"type": "step", "task": "classification", "epoch": 1, "loss": loss, "data_time": 0.01,
                "throughput": throughput}

    stream = tmp_path / "metrics.jsonl"
    records = [{"type": "start", "start_epoch": 0}, step(float("nan"), 20.0), {"type": "oom", "action": "gave_up"},
               {"type": "start", "start_epoch": 0, "resumed_at": None}, step(1.0, 150.0),
               {"type": "start", "start_epoch": 1}, step(0.9, 160.0), {"type": "oom", "action": "gave_up"},
               {"type": "start", "start_epoch": 0, "restart": 1}]  # a torchrun restart: the same job
    stream.write_text("".join(json.dumps(r) + "\n" for r in records) + '[1, 2]\n{"type": "st', encoding="utf-8")
    this_run = stage_measure.read_stream(stream)
    assert [r.get("loss") for r in this_run if r["type"] == "step"] == [1.0, 0.9]  # the resume's steps count
    run = stage_measure.run_figures({}, this_run)
    assert not run["nan_loss"] and run["repeated_oom"] == 1 and run["throughput_img_s"] == 155.0


def test_memory_peak_over_average_is_taken_per_task():
    """Interleaved steps of a detector needing 3 GB and a classifier needing 9.5 GB are not a spike: each task's
    steps are held to its own mean (mixed, 9500 / 6250 = 1.52 failed Stage 2's 1.5)."""
    steps = [{"type": "step", "task": task, "cuda_mem": mem}
             for _ in range(10) for task, mem in (("detection", 3000.0), ("classification", 9500.0))]
    assert stage_measure.memory_peak_over_avg(steps, []) == pytest.approx(1.0)
    spiked = steps + [{"type": "step", "task": "classification", "cuda_mem": 19000.0}]
    assert stage_measure.memory_peak_over_avg(spiked, []) == pytest.approx(19000 / np.mean([9500.0] * 10 + [19000]))


def test_class_balance_counts_the_drugs_the_classifier_trains_on(synth_cfg):
    """A stage keeps every pill of its combination photos, drugs outside the stage among them (a pill or two each):
    counted with them, any real stage's balance check would fail."""
    from pillsnap.data import load_manifest
    from pillsnap.data.stages import select_stage

    cfg = synth_cfg.copy()
    cfg.data.progressive_validation.stage_1.max_classes = 3
    rows = select_stage(load_manifest(cfg.paths.manifest_dir), cfg)
    train_rows = rows[rows["split"] == "train"]
    outside = train_rows[~train_rows["stage_class"]]
    assert len(outside) and not set(outside["mapping_code"]) & set(train_rows[train_rows["stage_class"]]
                                                                    ["mapping_code"])
    counts = train_rows[train_rows["stage_class"]]["mapping_code"].value_counts()
    assert len(counts) == 3
    assert stage_measure.class_imbalance(rows) == pytest.approx(counts.max() / counts.min())


def test_auto_batch_success_when_the_search_ran_or_the_configured_batch_trained_whole(synth_cfg):
    run = {"rank_batch": 4, "global_batch": 4}
    assert stage_measure.auto_batch_ok(synth_cfg, {"auto_batch": {}}, run)  # off (the default), batch 4 kept
    assert not stage_measure.auto_batch_ok(synth_cfg, {"auto_batch": {}}, {"rank_batch": 2, "global_batch": 2})
    # on 2 ranks the job's global batch is twice a rank's: a rank's batch cut by OOM is still a cut
    assert not stage_measure.auto_batch_ok(synth_cfg, {"auto_batch": {}}, {"rank_batch": 2, "global_batch": 4})
    assert stage_measure.auto_batch_ok(synth_cfg, {"auto_batch": {"classification": {"batch_size": 96}}}, run)
    assert not stage_measure.auto_batch_ok(synth_cfg, {"auto_batch": {"classification": {"batch_size": 0}}}, run)


def test_the_evaluation_device_and_refusals():
    assert str(evaluation_device({"system": {"device": "cpu"}})) in ("cpu", "cuda")
    assert str(evaluation_device({}, "cpu")) == "cpu"
    with pytest.raises(ValueError, match="not a device"):
        evaluation_device({}, "gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            evaluation_device({}, "cuda")
        assert str(evaluation_device({"system": {"device": "cuda:0"}})) == "cpu"  # reported as not comparable


def test_a_run_trained_on_a_gpu_this_machine_lacks_is_evaluated_on_one_it_has(monkeypatch):
    """A run trained on cuda:3 evaluated on a one-GPU machine goes to its GPU, cuda, not to a device it lacks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert str(evaluation_device({"system": {"device": "cuda:3"}})) == "cuda"
    assert str(evaluation_device({"system": {"device": "cuda:0"}})) == "cuda:0"


def test_evaluating_another_stage_than_the_run_trained_is_refused(synth_cfg, tmp_path, caplog):
    from omegaconf import OmegaConf

    from pillsnap.cli import main

    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "reports").mkdir()
    (exp / "checkpoints" / "classification_best.pt").write_bytes(b"not read: the stage is checked first")
    (exp / "reports" / "metrics.json").write_text(json.dumps({"stage": {"current_stage": 1}, "status": "completed"}))
    (exp / "config.yaml").write_text(OmegaConf.to_yaml(synth_cfg), encoding="utf-8")
    assert main(["evaluate", "--exp", str(exp), "--stage", "2"]) == 2
    assert "was trained on stage 1, not stage 2: evaluate it with --stage 1" in caplog.text
    assert not (exp / "reports" / "stage_2_evaluation.json").exists()
    assert main(["evaluate", "--exp", str(exp), "--stage", "1", "--device", "tpu9"]) == 2
    assert main(["evaluate", "--exp", str(exp), "--choice", "7"]) == 2
    assert finished_line(exp, 2).startswith("training finished; stage 2 not evaluated")


def test_the_pipeline_latency_is_the_splits_own_p95():
    """Nine in ten photos show one pill: the pipeline is timed on as many photos of each kind, each weighted by its
    kind's share, so the p95 is the split's whatever the draw (ten plain draws hold no combination photo a third of
    the time, and the p95 of ten is their slowest)."""
    import pandas as pd

    from pillsnap.eval.latency import weighted_percentile

    rows = pd.DataFrame({"split": "val", "photo_id": [f"p{i}" for i in range(100)],
                         "image_type": ["single"] * 90 + ["combination"] * 10,
                         "image_path": [f"/{'s' if i < 90 else 'c'}/{i}.png" for i in range(100)]})
    photos, weights, kinds = stage_measure._pipeline_photos(rows, seed=0)
    assert sum(p.startswith("/c/") for p in photos) == sum(p.startswith("/s/") for p in photos) == 5
    assert sum(weights) == pytest.approx(1.0)
    assert sum(w for p, w in zip(photos, weights, strict=True) if p.startswith("/c/")) == pytest.approx(0.1)
    assert stage_measure._pipeline_photos(rows, seed=0) == (photos, weights, kinds)
    assert kinds == ["combination" if p.startswith("/c/") else "single" for p in photos]
    # single photos take 50 ms, combination photos 200-240 ms: 10 % of the split is slower than 200 ms, so the
    # split's p95 lies among the combination photos, its median among the single ones
    times = [50.0 if p.startswith("/s/") else 200.0 + 10 * i for i, p in enumerate(photos)]
    assert 200.0 <= weighted_percentile(times, weights, 95) <= 240.0
    assert weighted_percentile(times, weights, 50) == 50.0
    assert weighted_percentile([3.0, 1.0, 2.0], [1, 1, 1], 50) == 2.0
    only_single = rows[rows["image_type"] == "single"]
    photos, weights, _ = stage_measure._pipeline_photos(only_single, seed=0)
    assert len(photos) == stage_measure.PIPELINE_SAMPLES and sum(weights) == pytest.approx(1.0)


def test_photos_by_kind_keep_to_the_number_asked_and_pass_on_unused_quota():
    import pandas as pd

    from pillsnap.data.stages import sample_by_kind

    photos = pd.DataFrame({"image_type": ["single"] * 30 + ["combination"] * 2 + [None],
                           "image_path": [f"/{i}.png" for i in range(33)]})
    drawn, weights = sample_by_kind(photos, 8, seed=0)
    kinds = drawn["image_type"].fillna("").tolist()
    assert len(drawn) == 8 and kinds.count("combination") == 2 and kinds.count("") == 1  # the rest: single
    assert weights.sum() == pytest.approx(1.0) and len(set(drawn["image_path"])) == 8
    assert len(sample_by_kind(photos, 0, seed=0)[0]) == 0 and len(sample_by_kind(photos, 1, seed=0)[0]) == 1
    assert len(sample_by_kind(photos.iloc[:0], 5, seed=0)[0]) == 0


def test_an_undecodable_batch_or_photo_is_left_out_of_the_stage_measurements(tmp_path, monkeypatch, caplog):
    """A batch whose every crop failed to decode (None, as data.datasets.safe_collate gives it) is skipped as
    validation skips it: the rest of the split is measured, not the whole measurement lost (which read as 0 samples
    and 0 coverage: NO_GO). A photo of the pipeline's sample that cannot be read is left out of its timing."""
    data = CountingCrops(40)

    def with_a_lost_batch(items: list) -> tuple | None:
        # the second batch (crops 8-15; the first crop's value is 8 % 7) is undecodable in every pass
        return None if items[0][0][0, 0, 0] == 1 else crop_batch(items)

    loaders = types.SimpleNamespace(cls_val=DataLoader(data, batch_size=8, collate_fn=with_a_lost_batch),
                                    meta={"num_classes": 4})
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    figures = stage_measure.classifier_figures(model, loaders, "cpu")
    assert figures["n_eval_samples"] == 32 and figures["n_eval_available"] == 40  # the second batch of 8 lost
    assert figures["n_eval_undecodable"] == 8 and "8 of 40 validation crops could not be decoded" in caplog.text
    assert figures["class_coverage"] == 1.0 and "per_class_min_acc" in figures and figures["latency"].samples > 0

    import pandas as pd
    from PIL import Image

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 32), (i * 40, 90, 90)).save(paths[-1])
    paths[2].write_bytes(b"not a png")
    rows = pd.DataFrame({"split": "val", "photo_id": [str(p) for p in paths], "image_type": "single",
                         "image_path": [str(p) for p in paths]})
    timed: list = []
    built: list = []

    class Timed:
        def __init__(self, exp_dir, cfg, device=None, sets=True) -> None:
            assert not cfg.inference.hard_cases.enabled  # a measurement's photos are not a user's hard cases
            self.reads = cfg.inference.imprint.enabled
            built.append((self.reads, sets))

        def predict(self, image, mode):
            timed.append((image.size, self.reads))

    monkeypatch.setattr("pillsnap.infer.pipeline.Predictor", Timed)
    cfg = OmegaConf.create({"train": {"seed": 0}, "inference": {"hard_cases": {"enabled": True},
                                                               "imprint": {"enabled": True}}})
    figures = stage_measure.pipeline_latency(cfg, tmp_path, rows, "cpu")
    latency = figures["pipeline"]
    assert latency is not None and math.isfinite(latency.p95_ms) and latency.samples == 3
    assert "pipeline latency: skipped" in caplog.text and "2.png" in caplog.text
    # the same photos again with imprint reading off: whether the reads are what misses the target
    assert figures["pipeline_without_imprint"].samples == 3 and {reads for _, reads in timed} == {True, False}
    # that one builds no sets: calibrated with reading on, they would be refused with a warning to recalibrate
    # that is about this measurement, not the run
    assert built == [(True, True), (False, False)]
    assert cfg.inference.imprint.enabled  # the caller's settings are left as they were
    cfg.inference.imprint.enabled = False
    assert stage_measure.pipeline_latency(cfg, tmp_path, rows, "cpu")["pipeline_without_imprint"] is None
    # each kind keeps its share of the split: the unreadable single photo's weight goes to the other single ones
    rows.loc[3, "image_type"] = "combination"
    weighed: list = []
    monkeypatch.setattr(stage_measure, "measure", lambda fn, images, device, passes, weights: weighed.append(
        (len(images), weights)))
    drawn, drawn_weights, _ = stage_measure._pipeline_photos(rows, 0)
    stage_measure.pipeline_latency(cfg, tmp_path, rows, "cpu")
    combination = sum(w for p, w in zip(drawn, drawn_weights, strict=True) if p.endswith("3.png"))
    (n, weights), = weighed  # imprint reading is off: one figure
    assert n == 3 and sum(weights) == pytest.approx(1.0) and combination in weights


def test_the_quality_figures_are_those_of_the_best_checkpoint_not_the_last_epoch(tmp_path, caplog):
    """After an early stop the last epoch is not the best, and everything after training (calibration, the stage
    measurements, the final test) uses the best checkpoints: the stage gate, the final test's val-minus-test gap and
    the demo's headline read the validation figures of the epoch each best checkpoint holds."""
    import logging

    from pillsnap.utils import save_ckpt

    ckpts = tmp_path / "checkpoints"

    def checkpoint(name: str, epoch: int) -> None:
        save_ckpt(ckpts / name, {"model_state": {}, "optimizer_state": {}, "scheduler_state": {}, "scaler_state": {},
                                 "epoch": epoch, "best_metric": 0.0, "config_snapshot": {}})

    history = [{"epoch": e, "classification": {"acc": a, "macro_f1": f, "top5": 0.9, "val_loss": 1.0, "n": 10},
                "detection": {"mAP@0.5": m, "mAP@0.5:0.95": m / 2, "precision": 1.0, "recall": 1.0}}
               for e, a, f, m in ((1, 0.5, 0.4, 0.3), (2, 0.8, 0.75, 0.6), (3, 0.7, 0.6, 0.7))]
    summary = {"epoch": 3, "status": "early_stopped", "history": history,
               "classification": {"acc": 0.7, "macro_f1": 0.6, "top5": 0.9, "val_loss": 1.0},
               "detection": {"mAP@0.5": 0.7, "mAP@0.5:0.95": 0.35, "precision": 1.0, "recall": 1.0}}
    checkpoint("classification_best.pt", 2)
    checkpoint("detection_best.pt", 3)
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        best = stage_measure.best_checkpoint_metrics(summary, ckpts)
    assert best["classification"] == {"acc": 0.8, "macro_f1": 0.75, "top5": 0.9, "val_loss": 1.0}
    assert best["detection"] == summary["detection"] and best["validated_epochs"] == {"classification": 2,
                                                                                       "detection": 3}
    assert summary["classification"]["acc"] == 0.7  # the record itself is left as it was
    assert "classification validation metrics of epoch 2, the best checkpoint's (the last epoch was 3)" in caplog.text
    # an epoch the history does not hold (a history cut back by a resume), or no checkpoint: the last epoch's
    checkpoint("classification_best.pt", 9)
    kept = stage_measure.best_checkpoint_metrics(summary, ckpts)
    assert kept["classification"] == summary["classification"] and "epoch 9, which metrics.json" in caplog.text
    (ckpts / "detection_best.pt").unlink()
    assert stage_measure.best_checkpoint_metrics(summary, ckpts)["validated_epochs"] == {}


def test_the_epoch_of_a_checkpoint_in_the_old_serialization_is_read_too(tmp_path):
    """A checkpoint saved without the zip serialization cannot be memory-mapped: it is read whole instead of the
    quality figures falling back to the last epoch's."""
    from pillsnap.utils import load_ckpt

    state = {"model_state": {"w": torch.zeros(2)}, "optimizer_state": {}, "scheduler_state": {}, "scaler_state": {},
             "epoch": 7, "best_metric": 0.5, "config_snapshot": {}}
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    torch.save(state, tmp_path / "new.pt")
    assert load_ckpt(tmp_path / "old.pt", mmap=True)["epoch"] == load_ckpt(tmp_path / "new.pt", mmap=True)["epoch"] == 7
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read checkpoint"):
        load_ckpt(tmp_path / "bad.pt", mmap=True)


def test_the_scale_checks_need_the_stages_classes_and_stage_4_a_whole_epoch(synth_cfg):
    """Stage 3's scalability check and stage 4's "whole data set processed" read what the run trained on: both need
    the stage's min_class_coverage classes (before, only the time-cap rule read it: a tenth of the drugs passed),
    and stage 4 a whole epoch's samples, not the 0.6 of an epoch its min_samples_required is. A run stopped by the
    time cap is still a stable one (the gate's TIME_CAP_REACHED says it ran out of time)."""
    from omegaconf import OmegaConf

    def checks(stage: int, samples: int, classes: int | None, status: str = "completed") -> dict:
        cfg = OmegaConf.merge(synth_cfg, {"data": {"progressive_validation": {"current_stage": stage}}})
        run = {"samples_seen": samples, "classes_seen": classes, "global_batch": 64, "memory_growth": 1.0,
               "memory_stable": True, "nan_loss": False, "rank_batch": 64}
        return stage_measure.mandatory_checks(cfg, Path("."), {"status": status}, run, {"classifier": object()},
                                              lambda: True, 1.0, train_rows=400_000)

    assert checks(3, 60_000, 1000)["scalability_test_pass"]
    assert not checks(3, 60_000, 100)["scalability_test_pass"]  # samples enough, a tenth of the drugs
    assert not checks(3, 10_000, 1000)["scalability_test_pass"]
    assert checks(3, 60_000, 1000, "time_capped")["stability_test_pass"]
    assert not checks(3, 60_000, 1000, "crashed")["stability_test_pass"]
    assert checks(4, 400_000 - 64, 4500)["full_dataset_processing"]  # the last, dropped batch forgiven
    assert not checks(4, 260_000, 4500)["full_dataset_processing"]  # past min_samples_required, not an epoch
    assert not checks(4, 800_000, 3000)["full_dataset_processing"]
    # a metrics.json from before classes_seen was kept: judged on the samples alone, not failed for a missing count
    assert checks(3, 60_000, None)["scalability_test_pass"] and checks(4, 400_000, None)["full_dataset_processing"]


def test_a_previous_evaluation_of_another_split_is_no_regression_baseline(caplog):
    """An old smoke test in the same folder (0.99 on 39 crops) said a real run's 0.88 had regressed."""
    from pillsnap.eval.stage_eval import regression_baseline

    smoke = {"results": {"classification": {"acc": 0.99}, "n_eval_available": 39}, "classifier_sha256": "a" * 64}
    assert regression_baseline(smoke, "b" * 64, {"n_eval_available": 18_525}) is None
    assert "another validation split (39 crops, now 18525)" in caplog.text
    assert regression_baseline(smoke, "b" * 64, {"n_eval_available": 39}) == smoke["results"]
    older = {"results": {"classification": {"acc": 0.99}}}  # a report from before the split size was kept
    assert regression_baseline(older, "b" * 64, {"n_eval_available": 39}) == older["results"]
    # the same weights evaluated again keep their baseline only where it measured this split: a report written
    # before splits were kept carries the smoke test's 0.99 on as "the baseline" of the real run's weights
    inherited = {"results": {"n_eval_available": 18_525}, "classifier_sha256": "b" * 64,
                 "baseline": {"classification.acc": 0.99}}
    assert regression_baseline(inherited, "b" * 64, {"n_eval_available": 18_525}) is None
    inherited["baseline"]["n_eval_available"] = 18_525
    assert regression_baseline(inherited, "b" * 64, {"n_eval_available": 18_525})["classification"]["acc"] == 0.99
