"""Scan throughput vs a plain single-process `json.load` loop over the same label files (ratio, one run), and
the scan's peak memory (main process + workers, PSS) at two data-set sizes to show it stays flat.

Label files only, in TL_k zips like the real data set (images are empty TS_k zip members: the scan checks that an
image exists, never decodes it).
Each size runs in its own process so memory figures do not mix.

    .venv/bin/python bench/bench_scan.py --sizes 100000 400000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import psutil

from pillsnap.data import aihub
from pillsnap.data.scan import scan_dataset
from pillsnap.data.synth import make_classes

GRID = [(b, d, lc, la, lo) for b in "012" for d in "01" for lc in "012" for la in aihub.CAMERA_LA
        for lo in aihub.CAMERA_LO]


def _labels(n_files: int, per_class: int):
    """(code, stem, label bytes) for n_files single-pill labels, per_class photos per class."""
    classes = make_classes(-(-n_files // per_class), seed=0)
    rng = random.Random(0)
    written = 0
    for drug in classes:
        for b, d, lc, la, lo in GRID[: min(per_class, n_files - written)]:
            stem = f"{drug.code}_0_{b}_{d}_{lc}_{la}_{lo:03d}_200"
            fields = {"file_name": f"{stem}.png", "width": 976, "height": 1280, "imgfile": f"{stem}.png",
                      "drug_N": drug.code, "drug_S": "정상알약", "back_color": aihub.BACK_COLOR[b],
                      "drug_dir": aihub.DRUG_DIR[d], "light_color": aihub.LIGHT_COLOR[lc], "camera_la": la,
                      "camera_lo": lo, "size": 200, **drug.fields}
            box = (rng.randint(300, 400), rng.randint(500, 600), rng.randint(150, 300), rng.randint(150, 300))
            yield drug.code, stem, aihub.dump_label(aihub.build_label(fields, box, 1, 1))
            written += 1


def make_label_zips(root: Path, n_files: int, per_class: int) -> None:
    """TL_k_단일.zip label zips (50 classes each, deflated, like the real ones) + TS_k_단일.zip image zips whose
    members are empty placeholders. Zips, not loose files: creating 800K inodes on this shared disk takes longer
    than everything else, and the real data set ships as zips anyway."""
    (root / "라벨링데이터").mkdir(parents=True)
    (root / "원천데이터").mkdir(parents=True)
    zips: dict[int, tuple[zipfile.ZipFile, zipfile.ZipFile]] = {}
    codes: dict[str, int] = {}
    for code, stem, raw in _labels(n_files, per_class):
        k = codes.setdefault(code, len(codes) // 50 + 1)
        if k not in zips:
            for pair in zips.values():
                pair[0].close()
                pair[1].close()
            zips = {k: (zipfile.ZipFile(root / "라벨링데이터" / f"TL_{k}_단일.zip", "w", zipfile.ZIP_DEFLATED),
                        zipfile.ZipFile(root / "원천데이터" / f"TS_{k}_단일.zip", "w", zipfile.ZIP_STORED))}
        labels, images = zips[k]
        labels.writestr(f"{code}_json/{stem}.json", raw)
        images.writestr(f"{code}/{stem}.png", b"")
    for pair in zips.values():
        pair[0].close()
        pair[1].close()


def json_load_loop(root: Path) -> tuple[int, float]:
    """The baseline: one process, every label member of every label zip through json.load."""
    zips = sorted((root / "라벨링데이터").glob("*.zip"))
    start, n = time.perf_counter(), 0
    for path in zips:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith(".json"):
                    with zf.open(name) as fh:
                        json.load(fh)
                    n += 1
    return n, time.perf_counter() - start


def _pss(proc: psutil.Process) -> int:
    # PSS splits pages shared by forked workers (imports, page cache maps) among them; RSS would count them N times.
    try:
        return proc.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return proc.memory_info().rss


class PeakRSS:
    """Samples the memory (PSS) of this process + all children every 0.5 s; `peak` in MiB."""

    def __init__(self) -> None:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += _pss(proc)
            self.peak = max(self.peak, total / 2**20)
            time.sleep(0.5)  # smaps reads are not free; chunked scans change memory slowly

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the scan's worker pool is joined on exit)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_size(n_files: int, per_class: int, workers: int, workdir: Path) -> dict:
    root, out = workdir / f"labels_{n_files}", workdir / f"manifests_{n_files}"
    start = time.perf_counter()
    make_label_zips(root, n_files, per_class)
    gen_s = time.perf_counter() - start
    cpu = time.process_time()
    n, base_s = json_load_loop(root)  # also warms the page cache for the scan
    base_cpu = time.process_time() - cpu
    idle_rss = _pss(psutil.Process()) / 2**20
    before = _cpu_seconds()
    with PeakRSS() as rss:
        start = time.perf_counter()
        report = scan_dataset(root, out, workers=workers, progress=False)
        scan_s = time.perf_counter() - start
    scan_cpu = _cpu_seconds() - before
    assert report["records_kept"] == n == n_files, report
    cleanup = time.perf_counter()
    shutil.rmtree(root)
    shutil.rmtree(out)
    print(f"  [{n_files}] generate {gen_s:.0f}s, baseline {base_s:.1f}s, scan {scan_s:.1f}s, "
          f"cleanup {time.perf_counter() - cleanup:.0f}s", file=sys.stderr)
    return {"files": n, "generate_s": round(gen_s, 1), "json_load_files_per_s": round(n / base_s),
            "scan_files_per_s": round(n / scan_s), "ratio": round(base_s / scan_s, 2),
            "json_load_cpu_us_per_file": round(base_cpu / n * 1e6, 1),
            "scan_cpu_us_per_file": round(scan_cpu / n * 1e6, 1),
            "scan_peak_pss_mib": round(rss.peak), "pss_before_scan_mib": round(idle_rss),
            "workers": report["workers"], "json_backend": aihub.JSON_BACKEND,
            "load_avg_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--per-class", type=int, default=400, help="labels per class (real: ~200-500)")
    parser.add_argument("--workers", type=int, default=0, help="scan processes (0 = all cores)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.per_class, args.workers, Path(args.workdir))))
        return
    print(f"cores: {os.cpu_count()}; baseline = single-process json.load loop over the same zipped labels (warm cache)")
    with tempfile.TemporaryDirectory(prefix="bench_scan_") as workdir:
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(size), "--per-class", str(args.per_class),
                   "--workers", str(args.workers), "--workdir", workdir]
            result = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
            print(json.dumps(result))
            print(f"  {size} files: scan {result['scan_files_per_s']} files/s vs json.load loop "
                  f"{result['json_load_files_per_s']} files/s -> ratio {result['ratio']}x (goal >= 1.5x); "
                  f"CPU per file {result['scan_cpu_us_per_file']} us (scan, all processes) vs "
                  f"{result['json_load_cpu_us_per_file']} us; "
                  f"scan peak memory {result['scan_peak_pss_mib']} MiB PSS, all processes "
                  f"({result['pss_before_scan_mib']} MiB before the scan)")


if __name__ == "__main__":
    main()
