#!/usr/bin/env bash
# Train PillSnap (the design's scripts/train.sh): checks the config, prepares exp_dir, writes the run's stdout and
# stderr to {exp_dir}/logs/train.out and train.err (still shown live), and explains the exit code.
# Usage: bash scripts/train.sh [--cfg config.yaml] [--stage N] [--epochs N] [--batch-size N] [--resume]
#                              [--checkpoint PATH] [--yes | --choice N] [--log-level LEVEL] [key=value ...]
#   --resume           continue from the last checkpoints (more --epochs than the run had: extend it)
#   --checkpoint PATH  resume the classifier from this checkpoint file
#   --yes, --choice N  answer the end-of-stage advisor without being asked
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
CFG="config.yaml"
OVERRIDES=()
EXTRA=()

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "train.sh: $1 needs a value (see --help)" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cfg) need "$@"; CFG="$2"; shift 2 ;;
    --stage) need "$@"; OVERRIDES+=("data.progressive_validation.current_stage=$2"); shift 2 ;;
    --epochs) need "$@"; OVERRIDES+=("train.epochs=$2"); shift 2 ;;
    --batch-size) need "$@"; OVERRIDES+=("train.batch_size=$2"); shift 2 ;;
    --resume) OVERRIDES+=("train.resume=last"); shift ;;
    --checkpoint) need "$@"; [ -f "$2" ] || { echo "train.sh: --checkpoint $2: no such file" >&2; exit 2; }
                  OVERRIDES+=("train.resume=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    --yes) EXTRA+=("--yes"); shift ;;
    --choice) need "$@"; EXTRA+=("--choice" "$2"); shift 2 ;;
    --log-level) need "$@"; EXTRA+=("--log-level" "$2"); shift 2 ;;
    -v|--verbose) EXTRA+=("--log-level" "DEBUG"); shift ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) echo "train.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

[ -x "$PY" ] || { echo "train.sh: $PY missing; run: bash scripts/setup_venv.sh" >&2; exit 1; }
cd "$ROOT"
EXP_DIR="$("$PY" - "$CFG" "${OVERRIDES[@]}" <<'PY'
import sys
from pillsnap.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    sys.exit(f"train.sh: config error: {err}")
print(cfg.paths.exp_dir)
print(f"stage={cfg.data.progressive_validation.current_stage} strategy={cfg.train.strategy} "
      f"backbone={cfg.model.backbone} detector={cfg.model.detector} epochs={cfg.train.epochs} "
      f"batch={cfg.train.batch_size} lr={cfg.train.lr} resume={cfg.train.resume}", file=sys.stderr)
PY
)" || exit 2

for sub in logs tb reports checkpoints export; do mkdir -p "$EXP_DIR/$sub"; done
echo "train.sh: exp_dir=$EXP_DIR (logs: $EXP_DIR/logs/train.out, train.err)"

# The process's own streams are the logs: progress on stdout, warnings/errors/tracebacks on stderr, each shown
# live and appended to its file, so a crash's traceback lands in train.err too.
export PILLSNAP_STREAMS_ARE_LOGS=1
"$PY" -m pillsnap.train --cfg "$CFG" "${EXTRA[@]}" "${OVERRIDES[@]}" \
  > >(tee -a "$EXP_DIR/logs/train.out") 2> >(tee -a "$EXP_DIR/logs/train.err" >&2)
rc=$?
wait  # let the tee processes flush before the summary line
case $rc in
  0) echo "train.sh: SUCCESS. Latest metrics: $EXP_DIR/reports/metrics.json" ;;
  2) echo "train.sh: FAILED: configuration or input error (see the message above)" >&2 ;;
  3) echo "train.sh: FAILED: OOM recovery exhausted; emergency checkpoint in $EXP_DIR/checkpoints" >&2 ;;
  4) echo "train.sh: stopped at the stage time cap without meeting its minimums (see $EXP_DIR/reports)" >&2 ;;
  130) echo "train.sh: interrupted; resume with: bash scripts/train.sh --resume" >&2 ;;
  *) echo "train.sh: FAILED with exit code $rc; see $EXP_DIR/logs/train.err" >&2 ;;
esac
exit $rc
