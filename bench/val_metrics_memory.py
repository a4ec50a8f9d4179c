"""Peak RSS and time of the per-epoch classification validation at the design's Stage 4 head size, against the
former way measured in the same run.

Every epoch validates the classifier. The pass now keeps, per batch, the labels, the top-1 class and probability and
whether the label is in each top k (`engine/classification.validate_classification`); the baseline is the former
way: every batch's softmax kept, concatenated into [N, classes], copied to float64 and ranked by `argpartition` of
its negation. The network is left out: the "model" passes random logits through, drawn batch by batch. Each way runs
in a fresh interpreter.

    .venv/bin/python bench/val_metrics_memory.py                      # 15,000 crops x 5,000 classes
    .venv/bin/python bench/val_metrics_memory.py --rows 75000          # a whole Stage 4 validation split
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(rows: int, classes: int, way: str) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from pillsnap.engine.classification import validate_classification
    from pillsnap.metrics.classification import metrics_from_hits

    torch.set_num_threads(1)

    class Logits:  # batches of 64 random logits, drawn as they are taken (the data set itself costs nothing)
        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            for start in range(0, rows, 64):
                n = min(64, rows - start)
                yield torch.randn(n, classes, generator=gen) * 3, torch.randint(0, classes, (n,), generator=gen)

    device, criterion = torch.device("cpu"), nn.CrossEntropyLoss()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if way == "now":
        figures = validate_classification(nn.Identity(), Logits(), criterion, device)
    else:  # the former pass: every batch's softmax kept and concatenated, a float64 copy, ranked by argpartition
        losses, probs, targets = [], [], []
        for logits, y in Logits():
            losses.append(criterion(logits, y).item() * len(y))
            probs.append(torch.softmax(logits, dim=1).cpu())
            targets.append(y.cpu())
        y_true, loss = torch.cat(targets).numpy(), float(np.sum(losses) / rows)
        y_prob = np.asarray(torch.cat(probs).numpy(), dtype=np.float64)
        hits = {k: (np.argpartition(-y_prob, kth=k - 1, axis=1)[:, :k] == y_true[:, None]).any(axis=1)
                for k in (1, 5)}
        figures = {"val_loss": loss, **metrics_from_hits(y_true, y_prob.argmax(axis=1), hits, y_prob.max(axis=1))}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"way": way, "seconds": round(seconds, 2), "peak_mib": round(peak), "added_mib": round(peak - base),
            "figures": {k: round(v, 6) for k, v in figures.items()}}


def run(rows: int, classes: int, way: str) -> dict:
    command = [sys.executable, __file__, "--child", way, "--rows", str(rows), "--classes", str(classes)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=15_000, help="validation crops (Stage 4: ~75,000)")
    parser.add_argument("--classes", type=int, default=5_000)
    parser.add_argument("--child", choices=("now", "before"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.rows, args.classes, args.child)))
        return 0
    before, now = run(args.rows, args.classes, "before"), run(args.rows, args.classes, "now")
    print(f"validation of {args.rows:,} crops x {args.classes:,} classes (one thread, random logits)")
    for result in (before, now):
        print(f"  {result['way']:>6}: {result['seconds']:7.2f} s, peak RSS {result['peak_mib']:,} MiB "
              f"(+{result['added_mib']:,} MiB over the interpreter and imports)")
    same = all(abs(before["figures"][k] - now["figures"][k]) < 1e-4 for k in now["figures"])
    print(f"  now / before: time {now['seconds'] / before['seconds']:.2f}x, added memory "
          f"{now['added_mib'] / max(before['added_mib'], 1):.3f}x; figures the same: {same}")
    print(f"  figures: {now['figures']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
