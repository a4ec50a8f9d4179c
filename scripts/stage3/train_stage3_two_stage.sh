#!/usr/bin/env bash
# Stage 3 two-stage training: classifier + detector, interleaved, after pre-flight checks (manifest, disk, GPU).
# Works for any stage (--stage N); logs go to {exp_dir}/logs/train.out|err; the stage ends with its evaluation.
# Usage: bash scripts/stage3/train_stage3_two_stage.sh [options] [key=value ...]
#   --epochs N           epochs of both models (default 18; a resume keeps the run's own unless given)
#   --batch-size N       classifier batch size          --det-batch-size N  detector batch size
#   --lr LR              classifier peak learning rate
#   --resume             continue from the last checkpoints (more --epochs than the run had: extend it)
#   --checkpoint PATH    resume from this checkpoint file (the detector from its file beside it)
#   --stage N            stage to train (default 3)     --cfg FILE          config (default: the repository's config.yaml)
#   --yes | --choice N   answer the end-of-stage advisor without being asked
#   --log-level LEVEL    DEBUG | INFO | WARNING | ERROR
#   --min-free-gb N      pre-flight: free disk needed at exp_dir (default 10)
#   --skip-checks        skip the pre-flight checks
#   -h, --help           this help
#   File paths (--cfg, --checkpoint) are relative to where you run it; key=value paths to the repository root.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
CFG="$ROOT/config.yaml"
STAGE=3
EPOCHS=""  # 18 for a new run; a resume keeps the epochs its run planned unless --epochs is given
MIN_FREE_GB="${PILLSNAP_MIN_FREE_GB:-10}"
CHECKS=1
PASS=()
OVERRIDES=()

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "train_stage3: $1 needs a value (see --help)" >&2; exit 2; }; }
fail() { echo "train_stage3: PRE-FLIGHT FAILED: $1" >&2; echo "  fix: $2" >&2; exit 2; }
# File arguments are made absolute here, before the script moves to the repository root.
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --epochs) need "$@"; EPOCHS="$2"; shift 2 ;;
    --batch-size) need "$@"; OVERRIDES+=("train.batch_size=$2"); shift 2 ;;
    --det-batch-size) need "$@"; OVERRIDES+=("train.detection.batch_size=$2"); shift 2 ;;
    --lr) need "$@"; OVERRIDES+=("train.lr=$2"); shift 2 ;;
    --stage) need "$@"; STAGE="$2"; shift 2 ;;
    --cfg) need "$@"; CFG="$(absolute "$2")"; shift 2 ;;
    --min-free-gb) need "$@"; MIN_FREE_GB="$2"; shift 2 ;;
    --skip-checks) CHECKS=0; shift ;;
    --resume|--yes|-v|--verbose) PASS+=("$1"); shift ;;
    --checkpoint) need "$@"; [ -f "$2" ] || { echo "train_stage3: --checkpoint $2: no such file" >&2; exit 2; }
                  PASS+=("$1" "$(absolute "$2")"); shift 2 ;;
    --choice|--log-level) need "$@"; PASS+=("$1" "$2"); shift 2 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "train_stage3: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
OVERRIDES=("data.progressive_validation.current_stage=$STAGE" "${OVERRIDES[@]}")

[ -x "$PY" ] || fail "$PY is missing" "bash scripts/setup_venv.sh"
[ -f "$CFG" ] || fail "config file $CFG not found" "pass --cfg path/to/config.yaml"
cd "$ROOT"
if [ -z "$EPOCHS" ]; then
  # a new run trains 18 epochs; a resumed one keeps its own plan: the checkpoint's (--checkpoint, train.resume=PATH)
  # or that of the run in exp_dir (--resume, train.resume=last)
  RESUME=()
  for ((i = 0; i < ${#PASS[@]}; i++)); do
    case "${PASS[$i]}" in
      --resume) RESUME=("train.resume=last") ;;
      --checkpoint) RESUME=("train.resume=${PASS[$((i + 1))]}") ;;
    esac
  done
  RESUMING=${#RESUME[@]}
  for o in "${OVERRIDES[@]}"; do case "$o" in train.resume=*) RESUMING=1 ;; esac; done
  EPOCHS=18  # a new run's, without starting Python to find it out
  [ "$RESUMING" = 0 ] || EPOCHS="$("$PY" -c 'import sys
from pathlib import Path
from omegaconf import OmegaConf
from pillsnap.config import load_config
from pillsnap.utils import load_ckpt
cfg = load_config(sys.argv[1], sys.argv[2:])
resume, run = str(cfg.train.resume or ""), Path(cfg.paths.exp_dir) / "config.yaml"
if resume not in ("", "last", "False", "false") and Path(resume).is_file():
    print(int(load_ckpt(resume, mmap=True)["config_snapshot"]["train"]["epochs"]))
elif resume == "last" and run.is_file():
    print(int(OmegaConf.load(run).train.epochs))
else:
    print(18)' "$CFG" "${OVERRIDES[@]}" "${RESUME[@]}")" \
    || fail "the epochs of the run to resume cannot be read (see above)" "pass --epochs N"
fi
OVERRIDES=("train.epochs=$EPOCHS" "${OVERRIDES[@]}")

if [ "$CHECKS" = 1 ]; then
  echo "train_stage3: pre-flight checks (stage $STAGE)"
  "$PY" "$HERE/validate_stage3_manifest.py" --cfg "$CFG" --stage "$STAGE" "${OVERRIDES[@]}" \
    || fail "the stage $STAGE manifest is missing or invalid (see the FAIL lines above)" \
            "pillsnap data scan --data-root ROOT --out MANIFEST_DIR, then pillsnap data manifest --stage $STAGE"
  EXP_DIR="$("$PY" -c 'import sys
from pillsnap.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).paths.exp_dir)' "$CFG" "${OVERRIDES[@]}")" \
    || fail "the config does not load" "run: python -m pillsnap.train --cfg $CFG --check"
  mkdir -p "$EXP_DIR"
  FREE_GB=$(df -Pk "$EXP_DIR" | awk 'NR==2 {print int($4 / 1048576)}')
  [ "$FREE_GB" -ge "$MIN_FREE_GB" ] \
    || fail "only ${FREE_GB} GB free at $EXP_DIR (need ${MIN_FREE_GB} GB for checkpoints and logs)" \
            "free disk space, set paths.exp_dir=... on a larger disk, or lower --min-free-gb"
  echo "OK   disk: ${FREE_GB} GB free at $EXP_DIR"
  # the GPUs the run will use: those CUDA_VISIBLE_DEVICES names (as indices or UUIDs; nvidia-smi counts in PCI bus
  # order, so set CUDA_DEVICE_ORDER=PCI_BUS_ID for indices to mean the same GPUs), else every GPU
  GPU_SELECT=()
  GPU_CHECK=1
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    VISIBLE="${CUDA_VISIBLE_DEVICES// /}"
    VISIBLE="${VISIBLE%%,-*}"  # CUDA reads the list up to its first negative entry
    case "$VISIBLE" in
      ""|-*) echo "NOTE GPU: CUDA_VISIBLE_DEVICES names none: training runs on the CPU, slowly"; GPU_CHECK=0 ;;
      *MIG-*) echo "NOTE GPU: MIG slices in CUDA_VISIBLE_DEVICES: a slice's own memory use is not checked"; GPU_CHECK=0 ;;
      *) GPU_SELECT=(-i "$VISIBLE") ;;
    esac
  fi
  if [ "$GPU_CHECK" = 0 ]; then
    :
  elif command -v nvidia-smi >/dev/null 2>&1; then
    # the design's check: each GPU less than 20 % used before training starts (another job on it would leave the
    # auto batch search and the run too little memory)
    GPUS=$(nvidia-smi "${GPU_SELECT[@]}" --query-gpu=index,memory.used,memory.total --format=csv,noheader,nounits \
           | tr -d ' ') \
      || fail "nvidia-smi cannot read the GPUs' memory" "check the driver (nvidia-smi), or --skip-checks"
    [ -n "$GPUS" ] || fail "nvidia-smi lists no GPU" "check the driver (nvidia-smi), or --skip-checks"
    while IFS=, read -r INDEX USED TOTAL; do
      case "$USED$TOTAL" in *[!0-9]*|"") fail "nvidia-smi gave no memory figures for GPU $INDEX ($USED of $TOTAL)" \
                                             "check the driver (nvidia-smi), or --skip-checks" ;; esac
      [ "$TOTAL" -gt 0 ] && [ $((100 * USED)) -lt $((20 * TOTAL)) ] \
        || fail "GPU $INDEX is already $((100 * USED / (TOTAL > 0 ? TOTAL : 1))) % used (${USED} of ${TOTAL} MB; the stage needs it under 20 %)" \
                "stop the other jobs on it (nvidia-smi lists them), or choose free GPUs with CUDA_VISIBLE_DEVICES"
      echo "OK   GPU $INDEX: ${USED} of ${TOTAL} MB used"
    done <<< "$GPUS"
  else
    echo "NOTE GPU: none found (nvidia-smi absent): training runs on the CPU, slowly"
  fi
fi

exec bash "$ROOT/scripts/train.sh" --cfg "$CFG" "${PASS[@]}" "${OVERRIDES[@]}"
