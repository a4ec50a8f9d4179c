#!/usr/bin/env bash
# PillSnap GPU check: bf16/TF32/channels_last/torch.compile training of the real model sizes, auto batch, a real
# OOM recovered, DDP, and latency against the design's targets, in time-boxed steps, into one JSON.
#
# Device run (one GPU, <= 8 min), from the repo root:
#   1. here, once (needs the package registry):   bash bench/gpu_check.sh --fetch-wheels
#   2. on the GPU machine, with the repo and its .whl folder copied there (it needs no network):
#                                                 bash bench/gpu_check.sh
#   The JSON goes to $OUT/gpu_check.json when $OUT is set (the device tool sets it), else --out, else
#   runs/gpu_check.json; the console log also goes to $OUT/gpu_check.log and the steps' logs to
#   $OUT/gpu_check_logs.tar.gz.
#
# Usage: bash bench/gpu_check.sh [--dry-run] [--out FILE] [--list] [--budget-s N] [--fetch-wheels] [-h]
#   --dry-run       the same steps on the CPU at tiny shapes (32-64 px, yolo11n, 2 steps, no compile)
#   --list          print the steps and their budgets
#   --fetch-wheels  download, here, the wheels the device image lacks into .whl/ (git-ignored locally)
#
# Python: $PYTHON if set; else .venv/bin/python; else a python3 that has torch (the device image), with .whl/*.whl
# installed into a scratch dir; else .venv is created with scripts/setup_venv.sh (minutes; needs a package index).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLED_FROM="$PWD"
cd "$ROOT"
# What the device image lacks (it has torch, timm, numpy, pandas, opencv, onnxruntime...); polars is left out: it is
# 54 MB and ultralytics imports it only for plots.
WHEELS="omegaconf ultralytics ultralytics-thop ultralytics-platform pycocotools orjson rapidocr-onnxruntime pyclipper shapely"
SITE="${TMPDIR:-/tmp}/pillsnap_gpu_check_site"
START=$SECONDS

say() { echo "gpu_check.sh: $*" >&2; }

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

fetch_wheels() {
  local py="${PYTHON:-$ROOT/.venv/bin/python}" pins
  pins="$("$py" - $WHEELS <<'PY'
import importlib.metadata as md, sys
print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
PY
)" || { say "ERROR: cannot read the installed versions with $py (run scripts/setup_venv.sh first)"; exit 2; }
  mkdir -p .git/info .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  say "downloading $pins for CPython 3.12 manylinux x86_64 into .whl/"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
  du -sh .whl >&2
}

has_deps() { "$1" -c 'import torch, timm, ultralytics, omegaconf, pillsnap' >/dev/null 2>&1; }

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; return; fi
  if command -v python3 >/dev/null && python3 -c 'import torch' >/dev/null 2>&1; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      say "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >&2
    fi
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if has_deps python3; then echo python3; return; fi
    say "python3 has torch but not the rest (no .whl/ carried?); falling back to a new .venv"
  fi
  say "creating .venv with scripts/setup_venv.sh: this takes minutes and needs a package index"
  bash scripts/setup_venv.sh >&2
  echo "$ROOT/.venv/bin/python"
}

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --fetch-wheels) fetch_wheels; exit 0 ;;
    --out|--work) [ $# -ge 2 ] || { say "ERROR: $1 needs a value"; exit 2; }
      case "$2" in /*) ARGS+=("$1" "$2") ;; *) ARGS+=("$1" "$CALLED_FROM/$2") ;; esac; shift ;;
    --budget-s) [ $# -ge 2 ] || { say "ERROR: $1 needs a value"; exit 2; }; ARGS+=("$1" "$2"); shift ;;
    --dry-run|--list) ARGS+=("$1") ;;
    *) say "ERROR: unknown option '$1' (see --help)"; exit 2 ;;
  esac
  shift
done

case " ${ARGS[*]:-} " in *" --list "*) exec "${PYTHON:-python3}" bench/gpu_check.py "${ARGS[@]}" ;; esac

PY="$(pick_python)"  # (a subshell: what it exports is set again here)
if [ "$PY" = python3 ]; then
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
has_deps "$PY" || { say "ERROR: $PY cannot import torch, timm, ultralytics, omegaconf and pillsnap"; exit 2; }
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)')), ready after $((SECONDS - START)) s"

WORK="$ROOT/runs/gpu_check_work"
rc=0
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  set -o pipefail
  "$PY" -u bench/gpu_check.py --work "$WORK" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log" || rc=$?
  [ -d "$WORK/logs" ] && tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" logs results 2>/dev/null || true
else
  "$PY" -u bench/gpu_check.py --work "$WORK" "${ARGS[@]}" || rc=$?
fi
say "done in $((SECONDS - START)) s (exit $rc)"
exit $rc
