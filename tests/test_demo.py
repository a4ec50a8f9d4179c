"""`pillsnap demo --tiny`: the whole job end to end on a tiny synthetic set, and a re-run that reuses it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pillsnap.cli import main as cli_main
from pillsnap.utils import read_json
from pillsnap.utils.io import file_sha256


@pytest.mark.slow
def test_demo_tiny_end_to_end_and_rerun(tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    import pillsnap.eval.enrol_eval as enrol_eval

    workdir = tmp_path / "demo"
    calls, enrol_all, answer = [], enrol_eval._enrol_all, enrol_eval.evaluate_pipeline
    monkeypatch.setattr(enrol_eval, "_enrol_all", lambda *a: calls.append("enrol") or enrol_all(*a))
    monkeypatch.setattr(enrol_eval, "evaluate_pipeline", lambda *a, **k: calls.append("answer") or answer(*a, **k))
    assert cli_main(["demo", "--tiny", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    # the enrolment's "before" is the evaluation's own auto pass, not the same photos answered again
    assert calls and calls[0] == "enrol"
    monkeypatch.undo()
    assert "headline figures" in out and "auto routing accuracy" in out and "tensorboard --logdir" in out
    assert "without imprint reading" in out and "unknown-pill AUROC" in out
    # the passes without imprint reading build no sets: no warning to recalibrate that was about them
    assert "were calibrated with imprint reading on and it is now off" not in caplog.text

    exp = workdir / "exp"
    for rel in ("checkpoints/classification_best.pt", "checkpoints/detection_best.pt", "checkpoints/classes.json",
                "reports/metrics.json", "export/detector.onnx", "logs/train.out"):
        assert (exp / rel).is_file(), rel
    assert any((exp / "tb").iterdir())
    summary = read_json(exp / "reports" / "demo_summary.json")
    auto = summary["test"]["auto"]
    assert auto["num_photos"] > 0 and 0.0 <= auto["routing_accuracy"] <= 1.0
    assert set(summary["test"]["detection"]) == {"torch", "onnx"}
    assert summary["test"]["auto_without_imprint_reading"]["num_photos"] == auto["num_photos"]
    assert set(summary["calibration"]["unknown_eval_by_rule"]) == {"feature_distance", "probability"}
    # the box check, calibrated for this very detector on the validation combination photos, and what it did
    box_check = read_json(exp / "checkpoints" / "calibration.json")["box_check"]
    assert box_check["detector_sha256"] == file_sha256(exp / "checkpoints" / "detection_best.pt")
    assert box_check["photos"] > 0 and box_check["pill_confidences"] == sorted(box_check["pill_confidences"])
    # the validation combination pills asked of this detector, each cut at the box it found where it found one, and
    # a temperature per crop source
    cut = summary["calibration"]["combination_boxes"]
    assert cut["pills"] > 0 and f"{cut['at_detector_boxes']} of {cut['pills']} combination pills cut at" in out
    assert set(summary["calibration"]["temperature_by_source"]) == {"single", "combination"}
    # the prediction sets: each calibration answer's crop source kept, the test coverage said per source, and the
    # other choice of inference.prediction_set.by_source drawn on the same answers
    sets = read_json(exp / "checkpoints" / "calibration.json")["prediction_sets"]
    assert len(sets["sources"]) == len(sets["scores"]["lac"]) and set(sets["sources"]) <= {"single", "combination"}
    by_source = auto["prediction_sets"]["by_source"]
    assert "single" in by_source and set(by_source) <= {"single", "combination"}
    assert "lac one threshold" in auto["prediction_sets_by_method"]
    assert f"single photos {by_source['single']['coverage']:.3f} of {by_source['single']['named']}" in out
    threshold = summary["calibration"]["box_check"]["conf_threshold"]  # the bound is drawn from the pills it keeps
    assert summary["calibration"]["box_check"]["pills"] == sum(c >= threshold for c in box_check["pill_confidences"])
    doubted = auto["doubted_boxes"]
    assert f"{doubted['no_pill']} on no labelled pill, {doubted['pill']} on a labelled pill" in out
    # torch and ONNX go through the same NMS: the same mAP on the same photos
    assert summary["test"]["detection"]["onnx"]["mAP@0.5"] == pytest.approx(
        summary["test"]["detection"]["torch"]["mAP@0.5"], abs=1e-3)
    assert summary["overlays"] and all(Path(p).stat().st_size > 0 for p in summary["overlays"])
    # the hard-case log holds the evaluation's first pass, each photo once: not the later passes over the same
    # photos, nor the stage evaluation's latency sample (in-memory photos, logged without a name)
    records = hard_case_records(exp)
    images = [r["image"] for r in records]
    assert records and None not in images and len(images) == len(set(images))
    assert (exp / "reports" / "confusion_matrix.png").is_file()
    kinds = [e["image_type"] for e in summary["examples"]]
    assert kinds == ["single", "combination"]
    assert all("mode_used" in e["result"] and e["result"]["pills"] is not None for e in summary["examples"])
    # the versions the figures were measured with: a fresh environment's newer renderer or decoder moves them
    import torch

    assert summary["environment"]["torch"].split("+")[0] == torch.__version__.split("+")[0]  # wheels differ on "+cpu"
    assert f"environment python {summary['environment']['python']} torch " in out

    ckpt = exp / "checkpoints" / "classification_best.pt"
    before = ckpt.stat().st_mtime_ns
    (exp / "checkpoints" / "calibration.json").unlink()  # e.g. a run trained by an older PillSnap
    caplog.clear()
    import time

    import pillsnap.demo

    enrol, ended = pillsnap.demo.enrolment_figures, []

    def slow_enrolment(*args, **kwargs):  # the last phase made to take a second: the demo's clock must hold it
        figures = enrol(*args, **kwargs)
        time.sleep(1.0)
        ended.append(time.perf_counter())
        return figures

    monkeypatch.setattr(pillsnap.demo, "enrolment_figures", slow_enrolment)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="pillsnap"):
        assert cli_main(["demo", "--tiny", "--workdir", str(workdir)]) == 0
    summary = read_json(exp / "reports" / "demo_summary.json")
    # less the command line's own start before the demo's clock (0.5 s on a loaded CI machine): a clock stopped
    # before the last phase would be short by the whole second slept and more
    assert summary["elapsed_s"] >= ended[0] - started - 0.9 and "enrolment" in summary
    assert f"done in {summary['elapsed_s']:.0f} s" in capsys.readouterr().out  # the figure the file keeps
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "data: reusing" in messages and "scan: reusing" in messages and "train: reusing" in messages
    assert ckpt.stat().st_mtime_ns == before
    assert (exp / "checkpoints" / "calibration.json").is_file()  # calibrated again, not trained again
    assert hard_case_records(exp) == records  # a rerun answers the same photos: it logs none of them again


def hard_case_records(exp: Path) -> list[dict]:
    return [r for path in sorted((exp / "hard_cases").glob("*.jsonl"))
            for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def test_demo_bad_data_root_is_named(tmp_path: Path, caplog) -> None:
    code = cli_main(["demo", "--workdir", str(tmp_path), "--data-root", str(tmp_path / "missing")])
    assert code == 2
    assert "does not exist" in caplog.text


def test_a_second_demo_in_the_same_workdir_is_refused_before_it_writes(tmp_path: Path, caplog) -> None:
    """Two demos in one --workdir would generate, scan and cache into the same folders at once."""
    from test_run_lock import hold_in_another_process

    from pillsnap.demo import DEMO_LOCK

    holder = hold_in_another_process(tmp_path / DEMO_LOCK)
    try:
        assert cli_main(["demo", "--tiny", "--workdir", str(tmp_path)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"{tmp_path / DEMO_LOCK} is held by pid {holder.pid}" in caplog.text
    assert "another demo is working in" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEMO_LOCK]


def test_new_data_removes_what_was_made_from_the_old(tmp_path: Path, monkeypatch, caplog) -> None:
    """Data generated again (its marker gone) under the same paths: the manifests and the crop cache, keyed by label
    path, would serve the old boxes and pixels without a sign. They are removed first; a folder outside the work
    directory is not touched, and a trained experiment is left and named."""
    import argparse

    import pillsnap.data
    from pillsnap.demo import demo_config, ensure_data

    workdir, outside = tmp_path / "demo", tmp_path / "team_cache"
    args = argparse.Namespace(workdir=str(workdir), tiny=True, data_root=None, cfg="none.yaml", overrides=[])
    made = {name: workdir / name / "made.txt" for name in ("manifests", "cache", "exp/checkpoints")}
    for path in [*made.values(), outside / "made.txt"]:
        path.parent.mkdir(parents=True)
        path.write_text("old")
    # the manifests are of the generated data: their scan read the demo's data folder
    report = {"data_root": str((workdir / "data").resolve())}
    (workdir / "manifests" / "scan_report.json").write_text(json.dumps(report))
    monkeypatch.setattr(pillsnap.data, "generate_dataset", lambda root, **kwargs: {"classes": 0})
    with caplog.at_level(logging.WARNING):
        ensure_data(demo_config(args), args)
    assert not made["manifests"].exists() and not made["cache"].exists() and made["exp/checkpoints"].exists()
    assert "was trained on the data generated before" in caplog.text
    (workdir / "data" / "synth_summary.json").unlink()
    (workdir / "cache").symlink_to(outside)  # the demo's cache linked to a folder elsewhere: named, not emptied
    caplog.clear()
    ensure_data(demo_config(args), args)
    assert (outside / "made.txt").exists() and f"{workdir / 'cache'} may hold what was made" in caplog.text
    args.overrides = [f"paths.cache_dir={outside}"]  # configured elsewhere: likewise
    (workdir / "data" / "synth_summary.json").unlink()
    caplog.clear()
    ensure_data(demo_config(args), args)
    assert (outside / "made.txt").exists() and f"{outside} may hold what was made" in caplog.text


def test_a_real_data_sets_scan_or_run_in_the_demos_folders_is_left_whole_and_named(tmp_path: Path, caplog) -> None:
    """The config's defaults are the demo's folders (runs/demo/...): a real data set's scan (hours at 2.6 M labels)
    and runs land there unless moved. The demo, generating its data, deleted that scan and its crop cache, and then
    evaluated a finished real run as its own; it now stops before it writes, naming the folder."""
    from pillsnap.demo import DEMO_LOCK

    workdir = tmp_path / "demo"
    (workdir / "manifests").mkdir(parents=True)
    (workdir / "cache").mkdir()
    (workdir / "cache" / "crops.bin").write_text("hours of crops")
    (workdir / "manifests" / "scan_report.json").write_text(json.dumps({"data_root": "/data/aihub"}))
    with caplog.at_level(logging.ERROR):
        assert cli_main(["demo", "--tiny", "--workdir", str(workdir)]) == 2
    assert "holds a scan of /data/aihub, not of the demo's data" in caplog.text
    assert sorted(p.name for p in workdir.iterdir() if p.name != DEMO_LOCK) == ["cache", "manifests"]
    assert (workdir / "cache" / "crops.bin").is_file() and (workdir / "manifests" / "scan_report.json").is_file()
    (workdir / "manifests" / "scan_report.json").unlink()
    (workdir / "exp").mkdir()
    (workdir / "exp" / "config.yaml").write_text("paths:\n  data_root: /data/aihub\n")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main(["demo", "--tiny", "--workdir", str(workdir)]) == 2
    assert "holds a run trained on /data/aihub, not on the demo's data" in caplog.text
    assert (workdir / "cache" / "crops.bin").is_file() and not (workdir / "data").exists()
