"""What the dashboard sends a page over a day of a Stage 4 run: the state whole on every change (the server before)
against the state whole once and then what changed (pillsnap.monitor.delta, now), same records, same run. The
records are those a Stage 4 run writes (the classifier and the detector interleaved, a step record every
train.step_log_interval steps of each, a validation record per task and epoch); each is taken as its own push, as
a page polling every second sees them at that pace. Sizes are the JSON text sent, and the same through
permessage-deflate, which uvicorn negotiates with browsers (one compressor per connection, its window kept between
messages, as the `websockets` library does by default).

    .venv/bin/python bench/dashboard_push_bytes.py [--hours 24 --steps-per-s 3]
"""

from __future__ import annotations

import argparse
import random
import time
import zlib


def stage4_records(hours: float, steps_per_s: float, log_every: int, epoch_steps: int) -> list[dict]:
    """A start record and the step, validation and epoch records of `hours` of training."""
    rng = random.Random(0)
    records: list[dict] = [{"type": "start", "time": 0.0, "tasks": ["classification", "detection"], "epochs": 40,
                            "stage": 4, "start_epoch": 0, "time_limit_hours": 48.0, "world_size": 1}]
    t, step = 1.0, 0
    while t < hours * 3600:
        step += 1
        t += 1.0 / steps_per_s
        epoch, in_epoch = 1 + (step - 1) // epoch_steps, (step - 1) % epoch_steps + 1
        if in_epoch % log_every == 0 or in_epoch == epoch_steps:
            for task, n in (("classification", 256), ("detection", 64)):
                records.append({"type": "step", "time": round(t, 3), "task": task, "epoch": epoch, "max_epochs": 40,
                                "step": in_epoch, "steps": epoch_steps, "global_step": step,
                                "loss": 2.0 / (1 + step / 5000) + rng.random() * 0.1, "lr": 1e-3 * rng.random(),
                                "n": n, "data_time": rng.random() * 0.02, "compute_time": 0.3 + rng.random() * 0.02,
                                "throughput": 700 + rng.random() * 50, "cuda_mem": 40000 + rng.random() * 900})
        if in_epoch == epoch_steps:
            records.append({"type": "val", "time": round(t + 1, 3), "task": "classification", "epoch": epoch,
                            "val_loss": rng.random(), "acc": rng.random(), "macro_f1": rng.random(),
                            "top5": rng.random(), "n": 75000})
            records.append({"type": "val", "time": round(t + 2, 3), "task": "detection", "epoch": epoch,
                            "mAP@0.5": rng.random(), "mAP@0.5:0.95": rng.random(), "precision": rng.random(),
                            "recall": rng.random(), "num_images": 39000})
            records.append({"type": "epoch", "time": round(t + 3, 3), "epoch": epoch})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24.0, help="hours of training replayed")
    parser.add_argument("--steps-per-s", type=float, default=3.0, help="optimizer steps a second")
    parser.add_argument("--log-every", type=int, default=20, help="train.step_log_interval")
    parser.add_argument("--epoch-steps", type=int, default=8000, help="steps an epoch")
    args = parser.parse_args(argv)

    from pillsnap.monitor.dashboard import dumps, state_message
    from pillsnap.monitor.state import MonitorState

    records = stage4_records(args.hours, args.steps_per_s, args.log_every, args.epoch_steps)
    state = MonitorState()
    sizes = {"whole": 0, "patches": 0}
    deflated = {"whole": 0, "patches": 0}
    compressors = {name: zlib.compressobj(wbits=-15) for name in sizes}
    held = None
    seconds = {"whole": 0.0, "patches": 0.0}
    for record in records:
        state.apply_all([record])
        snapshot = state.snapshot()
        start = time.perf_counter()
        whole = dumps({"kind": "state", "data": snapshot})
        seconds["whole"] += time.perf_counter() - start
        start = time.perf_counter()
        patch = state_message(held, snapshot)
        seconds["patches"] += time.perf_counter() - start
        held = snapshot
        for name, text in (("whole", whole), ("patches", patch)):
            if text is None:
                continue
            data = text.encode()
            sizes[name] += len(data)
            packed = compressors[name].compress(data) + compressors[name].flush(zlib.Z_SYNC_FLUSH)
            deflated[name] += len(packed)
    day = 24 / args.hours
    print(f"{len(records):,} records over {args.hours:g} h of training ({args.steps_per_s:g} steps/s, a record "
          f"every {args.log_every} steps of each task, {args.epoch_steps:,} steps an epoch); last state "
          f"{len(dumps({'kind': 'state', 'data': state.snapshot()})) / 1024:.1f} KB")
    for label, figures in (("JSON", sizes), ("permessage-deflate", deflated)):
        print(f"{label}: whole states {figures['whole'] * day / 2**20:,.1f} MiB a day, patches "
              f"{figures['patches'] * day / 2**20:,.1f} MiB a day: whole / patches "
              f"{figures['whole'] / figures['patches']:.1f}x")
    print(f"server time to make the messages: whole {seconds['whole'] / len(records) * 1000:.2f} ms, patches "
          f"{seconds['patches'] / len(records) * 1000:.2f} ms a record")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
