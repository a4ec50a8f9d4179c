"""Core utilities: atomic writes, checkpoint schema, seeding, AMP policy, compile fallback, TB fallback, timers."""

import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pillsnap.utils import (
    CKPT_REQUIRED_KEYS,
    StepTimer,
    TBWriter,
    append_jsonl,
    build_logger,
    enable_tf32,
    ensure_dir,
    get_git_sha,
    load_ckpt,
    read_json,
    save_ckpt,
    save_json,
    select_amp_dtype,
    set_seed,
    try_torch_compile,
)


def full_ckpt(**extra) -> dict:
    return {k: {} for k in CKPT_REQUIRED_KEYS} | {"epoch": 3, "best_metric": 0.5} | extra


def test_save_json_roundtrip_korean_unescaped(tmp_path):
    path = tmp_path / "a" / "b.json"
    save_json(path, {"name": "연회색 배경", "n": 1})
    assert "연회색" in path.read_text(encoding="utf-8")
    assert read_json(path) == {"name": "연회색 배경", "n": 1}


def test_save_json_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    save_json(path, {"ok": 1})
    with pytest.raises(ValueError, match="cannot serialise"):
        save_json(path, {"value": _Unserialisable()})
    assert read_json(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


class _Unserialisable:
    def __str__(self) -> str:
        raise ValueError("cannot serialise")


def test_read_json_names_file_on_corruption(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        read_json(path)


def test_append_jsonl(tmp_path):
    path = tmp_path / "s.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "lo')  # cut off by a crash or a full disk
    append_jsonl(path, {"type": "start", "note": "한글"})  # the resume's start record is not glued to it
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[2] == '{"step": 3, "lo' and json.loads(lines[3]) == {"type": "start", "note": "한글"}


def test_ckpt_roundtrip_and_schema(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_ckpt(path, full_ckpt(model_state={"w": torch.ones(2)}, ema_state={"w": torch.zeros(2)}))
    ckpt = load_ckpt(path)
    assert set(CKPT_REQUIRED_KEYS) <= set(ckpt)
    assert torch.equal(ckpt["model_state"]["w"], torch.ones(2))
    assert ckpt["schema_version"] == 1


def test_ckpt_rejects_missing_and_unknown_keys(tmp_path):
    bad = full_ckpt()
    del bad["scaler_state"]
    with pytest.raises(ValueError, match="scaler_state"):
        save_ckpt(tmp_path / "x.pt", bad)
    with pytest.raises(ValueError, match="surprise"):
        save_ckpt(tmp_path / "x.pt", full_ckpt(surprise=1))
    assert not (tmp_path / "x.pt").exists()


def test_ckpt_failed_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_ckpt(path, full_ckpt(epoch=1))

    def boom(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_ckpt(path, full_ckpt(epoch=2))
    monkeypatch.undo()
    assert load_ckpt(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_load_ckpt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_ckpt(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_ckpt(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a PillSnap checkpoint"):
        load_ckpt(tmp_path / "foreign.pt")


def test_set_seed_reproducible():
    set_seed(7)
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_seed(7)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_set_seed_deterministic_flags():
    set_seed(1, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    set_seed(1, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_select_amp_dtype(caplog):
    assert select_amp_dtype("fp16") is torch.float16
    assert select_amp_dtype("bf16") is torch.bfloat16
    with caplog.at_level(logging.INFO):
        assert select_amp_dtype("auto", device="cpu") is torch.bfloat16
    assert "bfloat16" in caplog.text
    with pytest.raises(ValueError, match="amp_dtype"):
        select_amp_dtype("fp8")


def test_enable_tf32_toggles():
    enable_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    enable_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"


def test_try_torch_compile_modes_and_fallback(monkeypatch, caplog):
    model = nn.Linear(2, 2)
    assert try_torch_compile(model, "none") is model
    with pytest.raises(ValueError, match="torch_compile"):
        try_torch_compile(model, "fastest")

    def broken_compile(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING):
        assert try_torch_compile(model, "reduce-overhead") is model
    assert "falling back to eager" in caplog.text


@pytest.mark.slow
def test_a_batch_of_another_size_leaves_the_full_batches_on_their_own_graph():
    """One odd batch (a photo dropped as undecodable) gets a graph of its own; with torch's default it would turn
    the batch dimension dynamic, and every later full batch would run the dynamic graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = try_torch_compile(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), "reduce-overhead")
    for n in (8, 7, 8, 6, 8):
        model(torch.randn(n, 16)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 3  # one per size, each static (the default: 2, the second dynamic)
    torch._dynamo.reset()


class FakeAllocator:
    """torch.cuda's peak statistics, for a machine without a GPU: `use(mb)` allocates and frees at once."""

    def __init__(self) -> None:
        self.peak = 0.0

    def use(self, mb: float) -> None:
        self.peak = max(self.peak, mb)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak * 2**20)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: setattr(self, "peak", 0.0))


def test_cuda_peaks_per_step_window_and_over_the_run_after_a_reset(monkeypatch):
    from pillsnap.utils.torch_utils import CudaPeaks

    gpu = FakeAllocator()
    gpu.install(monkeypatch)
    peaks = CudaPeaks()
    gpu.use(9000)  # the auto batch search's trials: not the run's
    peaks.reset()
    windows = []
    for step_mb in (1200, 3100, 1300):  # one step's activations come and go
        peaks.start_window()
        gpu.use(step_mb)
        windows.append(peaks.window_mb())
        gpu.use(5000 if step_mb == 3100 else 0)  # a validation between two steps: the run's, not the next step's
    assert windows == [1200, 3100, 1300]  # each step's own peak, not the largest so far
    assert peaks.peak_mb() == 5000
    gpu.use(6000)
    assert peaks.peak_mb() == 6000  # the open window counts


def test_tbwriter_writes_events(tmp_path):
    tb = TBWriter(tmp_path)
    tb.add_scalars({"train/loss": 1.5}, step=1)
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tbwriter_noop_without_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    tb = TBWriter(tmp_path)
    assert not tb.active
    tb.add_scalar("train/loss", 1.0, 1)
    tb.close()


def test_build_logger_writes_file_once(tmp_path):
    logger = build_logger(tmp_path, name="pillsnap.testlog")
    logger2 = build_logger(tmp_path, name="pillsnap.testlog")
    logger2.info("hello")
    for h in logger.handlers:
        h.flush()
    assert (tmp_path / "logs" / "pillsnap.testlog.log").read_text().count("hello") == 1


def test_step_timer_splits_times():
    timer = StepTimer()
    timer.data_done()
    sum(range(10000))
    timer.compute_done()
    assert timer.data_time >= 0 and timer.compute_time > 0
    assert timer.step_time == timer.data_time + timer.compute_time


def test_get_git_sha_outside_git(tmp_path):
    assert get_git_sha(tmp_path) == "nogit"


def test_ensure_dir(tmp_path):
    path = ensure_dir(tmp_path / "x" / "y")
    assert path.is_dir() and os.access(path, os.W_OK)


def test_atomic_writes_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_row_filler_fills_in_place_grows_and_trims():
    import numpy as np

    from pillsnap.utils.arrays import RowFiller

    filler = RowFiller(expected=5)
    filler.add(np.ones((2, 3), np.float32))
    first = filler.array
    filler.add(np.full((2, 3), 2, np.float32))
    assert filler.array is first and first.shape == (5, 3)  # one array of the expected size, written in place
    filler.add(np.full((3, 3), 3, np.float32))  # more rows than expected (a sampler that repeats): it grows
    out = filler.result()
    assert out.shape == (7, 3) and out.dtype == np.float32 and out[:, 0].tolist() == [1, 1, 2, 2, 3, 3, 3]
    short = RowFiller(expected=10)
    short.add(np.arange(4))
    assert short.result().tolist() == [0, 1, 2, 3]  # fewer rows came (photos that failed to decode): trimmed
    assert RowFiller(3).result((0, 0)).shape == (0, 0)


def test_every_lazy_export_is_the_object_it_names_not_a_module():
    """A module named like one of its package's lazy exports shadows it once imported: `from pillsnap.infer import
    rerank` gave the module infer/rerank.py, not the function, after the answer module was split."""
    import importlib
    import types
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "pillsnap"
    packages = [f"pillsnap.{p.parent.name}" for p in root.glob("*/__init__.py") if "lazy_exports(" in p.read_text()]
    assert packages
    for name in packages:
        package = importlib.import_module(name)
        for export in package.__all__:
            getattr(package, export)
        for export in package.__all__:  # again: every submodule is imported by now
            assert not isinstance(getattr(package, export), types.ModuleType), f"{name}.{export} is a module"


def test_progress_off_a_terminal_is_a_log_line_at_the_interval_with_what_is_left(monkeypatch, caplog):
    """A logged run (train.sh, nohup) has no terminal for a bar: a long pass says how far it is in the log."""
    import io
    import logging
    import sys

    from pillsnap.utils import logs

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    clock = iter(float(t) for t in range(0, 1000, 25))  # each item takes 25 s
    monkeypatch.setattr(logs.time, "monotonic", lambda: next(clock))
    logger = logging.getLogger("pillsnap.test_progress")
    with caplog.at_level(logging.INFO, logger=logger.name):
        assert list(logs.progress(range(10), "calibration: detector boxes", "photos", logger)) == list(range(10))
    lines = [r.getMessage() for r in caplog.records]
    # 25 s a photo, a line once 60 s have passed since the last: after photos 3, 6 and 9 (none after the last)
    assert lines == ["calibration: detector boxes: 3/10 photos, 0.04/s, about 3 min left",
                     "calibration: detector boxes: 6/10 photos, 0.04/s, about 2 min left",
                     "calibration: detector boxes: 9/10 photos, 0.04/s, about 25 s left"]
