#!/usr/bin/env bash
# Stage 3 training with a log level that reaches every logger, and the whole session (pre-flight checks, training,
# evaluation) also saved to {exp_dir}/logs/stage3_<date>_<time>.log.
# Usage: bash scripts/stage3/run_stage3_with_logs.sh [--log-level DEBUG|INFO|WARNING|ERROR] [train options ...]
#   every other option goes to train_stage3_two_stage.sh (see its --help)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
LEVEL="INFO"
ARGS=()
CFG="$ROOT/config.yaml"
KEYS=()

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --log-level) [ $# -ge 2 ] || { echo "run_stage3_with_logs: --log-level needs a value" >&2; exit 2; }
                 LEVEL="$(echo "$2" | tr '[:lower:]' '[:upper:]')"; shift 2 ;;
    --cfg) [ $# -ge 2 ] || { echo "run_stage3_with_logs: --cfg needs a value" >&2; exit 2; }
           case "$2" in /*) CFG="$2" ;; *) CFG="$PWD/$2" ;; esac  # absolute before the cd below
           ARGS+=("$1" "$CFG"); shift 2 ;;
    *=*) KEYS+=("$1"); ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
case "$LEVEL" in DEBUG|INFO|WARNING|ERROR) ;; *)
  echo "run_stage3_with_logs: --log-level must be DEBUG, INFO, WARNING or ERROR, got '$LEVEL'" >&2; exit 2 ;;
esac
[ -x "$PY" ] || { echo "run_stage3_with_logs: $PY missing; run: bash scripts/setup_venv.sh" >&2; exit 1; }

EXP_DIR="$(cd "$ROOT" && "$PY" -c 'import sys
from pillsnap.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).paths.exp_dir)' "$CFG" "${KEYS[@]}" 2>/dev/null)" || EXP_DIR="$ROOT/runs"
case "$EXP_DIR" in /*) ;; *) EXP_DIR="$ROOT/$EXP_DIR" ;; esac
mkdir -p "$EXP_DIR/logs"
LOG="$EXP_DIR/logs/stage3_$(date +%Y%m%d_%H%M%S).log"
echo "run_stage3_with_logs: log level $LEVEL; session log $LOG"

export PILLSNAP_LOG_LEVEL="$LEVEL"
# the tee ignores Ctrl-C and SIGTERM (as train.sh's do), so the trainer's last lines (the interrupt, the resume
# command) still reach the console and the session log
bash "$HERE/train_stage3_two_stage.sh" --log-level "$LEVEL" "${ARGS[@]}" 2>&1 | (trap '' INT TERM; exec tee -a "$LOG")
rc=${PIPESTATUS[0]}
echo "run_stage3_with_logs: exit code $rc; session log $LOG"
exit "$rc"
