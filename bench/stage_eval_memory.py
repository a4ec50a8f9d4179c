"""Peak RSS of the stage evaluation's classifier measurement against the validation split's size.

The evaluation streams the split once for its per-class figures and times a bounded sample, so its memory should
not grow with the split. Each measurement runs in a fresh interpreter; the baseline, measured in the same run, is
the former approach of holding every validation crop as a float tensor.

    python bench/stage_eval_memory.py                  # 2,000 vs 20,000 rows of 128 px crops
    python bench/stage_eval_memory.py --rows 500 5000 --size 64
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def child(rows: int, size: int, mode: str) -> None:
    import types

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from pillsnap.eval import stage_measure

    torch.set_num_threads(1)

    class Crops(Dataset):
        def __len__(self) -> int:
            return rows

        def __getitem__(self, i: int):
            return np.full((3, size, size), (i % 7) / 7, np.float32), i % 4

    def collate(items):
        return torch.from_numpy(np.stack([x for x, _ in items])), torch.tensor([y for _, y in items])

    loader = DataLoader(Crops(), batch_size=32, collate_fn=collate)
    loaders = types.SimpleNamespace(cls_val=loader, meta={"num_classes": 4})
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 4)).eval()
    if mode == "streamed":
        stage_measure.classifier_figures(model, loaders, "cpu")
    else:  # the former evaluation: every validation crop materialised, to time a few of them
        crops = [x[None] for batch in loader for x in batch[0]]
        assert len(crops) == rows
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure(rows: int, size: int, mode: str) -> float:
    command = [sys.executable, __file__, "--child", mode, "--rows", str(rows), str(rows), "--size", str(size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[2000, 20000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--child", choices=["streamed", "materialised"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.rows[0], args.size, args.child)
        return
    small, large = args.rows
    baseline = measure(small, args.size, "materialised")
    print(f"former evaluation, {small} rows: peak RSS {baseline:.0f} MiB (baseline)")
    streamed = {n: measure(n, args.size, "streamed") for n in (small, large)}
    for n, mib in streamed.items():
        print(f"streamed evaluation, {n} rows: peak RSS {mib:.0f} MiB ({mib / baseline:.2f}x the baseline)")
    print(f"{large} vs {small} rows: {streamed[large] / streamed[small]:.3f}x (goal: within 1.10x)")


if __name__ == "__main__":
    main()
