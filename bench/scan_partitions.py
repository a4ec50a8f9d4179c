"""The scan of a data set whose drugs have photos in both of AI Hub's partitions, as the real one ships them:
each code folder in a Training zip (TS_k, labelled in TL_k) and again in a Validation zip (VS_k, labelled in VL_k).
This code (each label folder looks for its photos in its own partition: pillsnap.data.scan_walk.photo_locations)
against the pairing before it (every partition's photos of the code), in the same run on the same tree: wall and
CPU time, label files kept, and photos reported without a label.

Label files and empty photo members only (the scan never decodes a photo), 1 in 8 photos in the Validation
partition (the real set: 0.16 M of 2.63 M).

Since a label folder's copies in both partitions are scanned as one folder (scan_walk._merge_copies), whose photos
are looked up wherever any copy would look, the "before" arm no longer reproduces the old pairing: compare the
"now" arm across commits instead (`PYTHONPATH=<worktree of the other commit> .venv/bin/python
bench/scan_partitions.py`).

    .venv/bin/python bench/scan_partitions.py --labels 40000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scan import _cpu_seconds, _labels  # noqa: E402  (the bench folder is not a package)

from pillsnap.data import scan, scan_walk  # noqa: E402

VALIDATION_EVERY = 8


def make_partitions(root: Path, n_files: int, per_class: int, interleave: int = 0) -> int:
    """TL/TS zips under 1.Training and VL/VS zips under 2.Validation (50 codes a zip, every code in both);
    returns how many photos are in the Validation partition. `interleave` N: the Validation zips hold the codes
    dealt round N zips (code i in VL_{i % N + 1}), so consecutive codes of a Training zip lie in different ones."""
    zips: dict[tuple[str, int], zipfile.ZipFile] = {}

    def zip_of(part: str, kind: str, k: int) -> zipfile.ZipFile:
        tag = ("T" if part == "1.Training" else "V") + ("L" if kind == "라벨링데이터" else "S")
        key = (f"{part}/{kind}", k)
        if key not in zips:
            folder = root / part / kind / "단일경구약제 5000종"
            folder.mkdir(parents=True, exist_ok=True)
            zips[key] = zipfile.ZipFile(folder / f"{tag}_{k}_단일.zip", "w",
                                        zipfile.ZIP_DEFLATED if kind == "라벨링데이터" else zipfile.ZIP_STORED)
        return zips[key]

    codes: dict[str, int] = {}
    validation = 0
    for n, (code, stem, raw) in enumerate(_labels(n_files, per_class)):
        k = codes.setdefault(code, len(codes) // 50 + 1)
        part = "2.Validation" if n % VALIDATION_EVERY == 0 else "1.Training"
        validation += part == "2.Validation"
        if part == "2.Validation" and interleave:
            k = list(codes).index(code) % interleave + 1
        zip_of(part, "라벨링데이터", k).writestr(f"{code}_json/{stem}.json", raw)
        zip_of(part, "원천데이터", k).writestr(f"{code}/{stem}.png", b"")
    for handle in zips.values():
        handle.close()
    return validation


def scan_once(root: Path, out: Path, workers: int, old_pairing: bool) -> dict:
    saved = scan_walk.photo_locations
    if old_pairing:  # every partition's photos of the code, as before (in the tasks and in the unlabelled count)
        scan_walk.photo_locations = scan.photo_locations = lambda label, images: tuple(images)
    try:
        cpu, start = _cpu_seconds(), time.perf_counter()
        report = scan.scan_dataset(root, out, workers=workers, progress=False)
        return {"wall_s": time.perf_counter() - start, "cpu_s": _cpu_seconds() - cpu,
                "kept": report["records_kept"], "image_without_label": report["image_without_label"]}
    finally:
        scan_walk.photo_locations = scan.photo_locations = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=40000, help="label files in all (default 40,000)")
    parser.add_argument("--per-class", type=int, default=200, help="photos per drug (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="scan workers (default 2)")
    parser.add_argument("--interleave", type=int, default=0,
                        help="deal the codes round this many Validation zips (default 0: VL_k holds TL_k's codes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scan_partitions_") as tmp:
        root = Path(tmp) / "data"
        validation = make_partitions(root, args.labels, args.per_class, args.interleave)
        print(f"{args.labels} labels, {validation} of them in the Validation partition, every code in both; "
              f"{args.workers} workers")
        results = {}
        for name, old in (("each partition's own photos (now)", False), ("both partitions' photos (before)", True),
                          ("each partition's own photos (now, again)", False)):
            results[name] = scan_once(root, Path(tmp) / f"m_{len(results)}", args.workers, old)
            r = results[name]
            print(f"  {name:<42} wall {r['wall_s']:.1f} s  cpu {r['cpu_s']:.1f} s  records kept {r['kept']}  "
                  f"photos without a label {r['image_without_label']}")
    now = [r for name, r in results.items() if "now" in name]
    before = results["both partitions' photos (before)"]
    best_now = min(r["cpu_s"] for r in now)
    print(f"ratio (before / now, best of the two 'now' runs): cpu {before['cpu_s'] / best_now:.2f}x, wall "
          f"{before['wall_s'] / min(r['wall_s'] for r in now):.2f}x; photos without a label "
          f"{before['image_without_label']} vs {now[0]['image_without_label']}")


if __name__ == "__main__":
    main()
