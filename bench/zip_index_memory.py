"""Memory a data-loader worker holds to read photos out of the real data's image zips: a zipfile.ZipFile kept open
per zip (the former way: every member's ZipInfo stays alive) against `utils.zips.ZipIndex` (names and offsets in
numpy arrays), each in a fresh interpreter on the same zips, plus the time per read.

The real training photos lie in ~90 zips of ~30,000 members (~2.5 M in all). The bench writes `--zips` zips of
`--members` small stored members with AI Hub-style names, opens every zip and reads members at random.

    .venv/bin/python bench/zip_index_memory.py [--zips 12 --members 30000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path


def write_zips(root: Path, zips: int, members: int) -> list[Path]:
    paths = []
    for z in range(zips):
        path = root / f"TS_{z + 1}_single.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for m in range(members):
                code = f"K-{(z * members + m) // 60:06d}"
                zf.writestr(f"{code}/{code}_0_2_0_2_75_000_{m:06d}.png", b"p" * 64)
        paths.append(path)
    return paths


def rss_mib() -> float:
    """Resident memory now (not the peak: building an index passes through the zip's whole directory)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def child(paths: list[str], way: str, reads: int) -> dict:
    import gc
    import random

    from pillsnap.utils.zips import ZipIndex

    gc.collect()
    base = rss_mib()
    start = time.perf_counter()
    opened = {p: (zipfile.ZipFile(p) if way == "zipfile" else ZipIndex(p)) for p in paths}
    built = time.perf_counter() - start
    gc.collect()
    held = rss_mib() - base
    names = {p: (z.namelist() if way == "zipfile" else [n.decode() for n in z.names])[::997]
             for p, z in opened.items()}
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(reads):
        p = rng.choice(paths)
        opened[p].read(rng.choice(names[p]))
    per_read = (time.perf_counter() - start) / max(reads, 1)
    return {"way": way, "added_mib": round(held, 1), "open_s": round(built, 2), "read_us": round(per_read * 1e6, 1)}


def run(paths: list[Path], way: str, reads: int) -> dict:
    command = [sys.executable, __file__, "--child", way, "--reads", str(reads), *map(str, paths)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zips", type=int, default=12)
    parser.add_argument("--members", type=int, default=30_000)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--child", choices=("zipfile", "index"), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.paths, args.child, args.reads)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_zips(Path(tmp), args.zips, args.members)
        before, now = run(paths, "zipfile", args.reads), run(paths, "index", args.reads)
    total = args.zips * args.members
    print(f"{args.zips} zips x {args.members:,} members ({total:,}), {args.reads} random reads")
    for r in (before, now):
        print(f"  {r['way']:>8}: +{r['added_mib']:,.1f} MiB held ({r['added_mib'] * 2**20 / total:,.0f} bytes a "
              f"member), {r['open_s']} s to open, {r['read_us']} us a read")
    scale = 2.5e6 / total / 1024
    print(f"  index / zipfile: memory {now['added_mib'] / max(before['added_mib'], 1e-9):.3f}x, "
          f"read time {now['read_us'] / max(before['read_us'], 1e-9):.2f}x; at 2.5 M members: "
          f"{before['added_mib'] * scale:.2f} GiB vs {now['added_mib'] * scale:.2f} GiB a worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
