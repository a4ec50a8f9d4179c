#!/usr/bin/env bash
# Train PillSnap (the design's scripts/train.sh): checks the config, prepares exp_dir, writes the run's stdout and
# stderr to {exp_dir}/logs/train.out and train.err (still shown live), and explains the exit code.
# Usage: bash scripts/train.sh [--cfg FILE] [--stage N] [--epochs N] [--batch-size N] [--resume]
#                              [--checkpoint PATH] [--yes | --choice N] [--log-level LEVEL] [key=value ...]
#   --cfg FILE         the config (default: the repository's config.yaml, whatever folder you call from)
#   --resume           continue from the last checkpoints (more --epochs than the run had: extend it)
#   --checkpoint PATH  resume from this checkpoint file (the classifier's; the detector's file beside it too)
#   --yes, --choice N  the end-of-stage advisor's answer (the script never asks: without them, its default)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARGS=("$@")  # as given, for the exact resume command after an interruption
PY="$ROOT/.venv/bin/python"
CFG="config.yaml"
OVERRIDES=()
EXTRA=()

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
resume_command() {  # this command line again, continuing from the last checkpoints instead of where it began
  # from any folder: the script and the config by their absolute paths (the config as this run read it)
  local out=() skip=0 a
  for a in "${ARGS[@]}"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$a" in --checkpoint|--cfg) skip=1 ;; --resume|train.resume=*) ;; *) out+=("$a") ;; esac
  done
  printf '%q ' bash "$ROOT/scripts/train.sh" --cfg "$(cd "$ROOT" && cd "$(dirname "$CFG")" && pwd)/$(basename "$CFG")" \
    "${out[@]}"; printf -- '--resume\n'
}
need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "train.sh: $1 needs a value (see --help)" >&2; exit 2; }; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cfg) need "$@"; [ -f "$2" ] || { echo "train.sh: --cfg $2: no such file" >&2; exit 2; }
           CFG="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;  # absolute: the script cds to the root
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
RESOLVED="$("$PY" - "$CFG" "${OVERRIDES[@]}" <<'PY'
import sys
from pillsnap.config import ConfigError, check_tf32, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    check_tf32(cfg)
except ConfigError as err:
    sys.exit(f"train.sh: config error: {err}")
# A folder another run holds: said here, before this run's output is appended to that run's log files.
from pathlib import Path
from pillsnap.utils.locks import RUN_LOCK, BusyError, file_lock  # not the engine's: that imports torch
try:
    with file_lock(Path(cfg.paths.exp_dir) / RUN_LOCK, role="check"):
        pass
except BusyError as err:
    sys.exit(f"train.sh: {err}; wait for that run to end or stop it, or train into another folder "
             "(paths.exp_dir=...)")
print(cfg.paths.exp_dir)
print(cfg.data.progressive_validation.current_stage)
print(f"stage={cfg.data.progressive_validation.current_stage} strategy={cfg.train.strategy} "
      f"backbone={cfg.model.backbone} detector={cfg.model.detector} epochs={cfg.train.epochs} "
      f"batch={cfg.train.batch_size} lr={cfg.train.lr} resume={cfg.train.resume}", file=sys.stderr)
PY
)" || exit 2
EXP_DIR="$(sed -n 1p <<<"$RESOLVED")"
STAGE="$(sed -n 2p <<<"$RESOLVED")"
START="$(date +%s)"

for sub in logs tb reports checkpoints export; do mkdir -p "$EXP_DIR/$sub"; done
echo "train.sh: exp_dir=$EXP_DIR (logs: $EXP_DIR/logs/train.out, train.err)"

# The process's own streams are the logs: progress on stdout, warnings/errors/tracebacks on stderr, each shown
# live and appended to its file, so a crash's traceback lands in train.err too. The tee processes ignore Ctrl-C
# and SIGTERM: they end when the trainer's streams close, so the run's last lines (status, resume hint) still
# reach the files and the console, and the script waits for them before its summary line.
export PILLSNAP_STREAMS_ARE_LOGS=1
exec {OUT_FD}> >(trap '' INT TERM HUP QUIT; exec tee -a "$EXP_DIR/logs/train.out")
OUT_TEE=$!
exec {ERR_FD}> >(trap '' INT TERM HUP QUIT; exec tee -a "$EXP_DIR/logs/train.err" >&2 {OUT_FD}>&-)
ERR_TEE=$!
# The trainer runs in the background so that this script can pass on a stop sent to it alone (`kill`, `timeout`, a
# supervisor stopping the script): run in the foreground, it would be left training with the GPU and the folder's
# lock while the script died. Ctrl-C becomes a SIGTERM too (bash starts background commands with SIGINT ignored).
TRAINER=""
STOP=""
stop() {  # a stop before the trainer's pid is known is passed on as soon as it is
  STOP=1
  [ -n "$TRAINER" ] && kill -TERM "$TRAINER" 2>/dev/null
}
trap stop INT TERM HUP USR1 QUIT
"$PY" -m pillsnap.train --cfg "$CFG" "${EXTRA[@]}" "${OVERRIDES[@]}" \
  >&"$OUT_FD" 2>&"$ERR_FD" {OUT_FD}>&- {ERR_FD}>&- &
TRAINER=$!
[ -n "$STOP" ] && kill -TERM "$TRAINER" 2>/dev/null
while :; do
  wait "$TRAINER"
  rc=$?
  kill -0 "$TRAINER" 2>/dev/null && continue  # a trapped signal ended the wait early: the trainer goes on
  if [ "$rc" -gt 128 ]; then  # ... or the trainer ended just then: its own status, where bash kept it
    wait "$TRAINER"
    last=$?
    [ "$last" -ne 127 ] && rc=$last
  fi
  break
done
trap - INT TERM HUP USR1
exec {OUT_FD}>&- {ERR_FD}>&-
for _ in $(seq 100); do  # up to 10 s for the tees to write the last lines (a stray child may hold the pipes)
  kill -0 "$OUT_TEE" 2>/dev/null || kill -0 "$ERR_TEE" 2>/dev/null || break
  sleep 0.1
done
# The last line says one thing: how training ended and, when the stage was evaluated, its decision and the next
# step, read from the evaluation this run wrote (an older file belongs to another run).
verdict() {
  "$PY" - "$EXP_DIR" "$STAGE" "$START" <<'PY' || echo "train.sh: training finished; see $EXP_DIR/reports"
import sys
from pillsnap.eval.stage_eval import finished_line
print("train.sh: " + finished_line(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
PY
}
trained_before_interrupt() {  # the run's own rule: its training had ended, the interrupt came in the work after it
  "$PY" - "$EXP_DIR" "$START" <<'PY'
import sys
from pillsnap.train import training_ended
sys.exit(0 if training_ended(sys.argv[1], float(sys.argv[2])) else 1)
PY
}
case $rc in
  0) echo "train.sh: latest metrics: $EXP_DIR/reports/metrics.json"; verdict ;;
  2) echo "train.sh: FAILED: configuration or input error (see the message above)" >&2 ;;
  3) echo "train.sh: FAILED: OOM recovery exhausted; emergency checkpoint in $EXP_DIR/checkpoints" >&2 ;;
  4) echo "train.sh: stopped at the stage time cap without meeting its minimums (see $EXP_DIR/reports)" >&2
     verdict ;;
  5) echo "train.sh: training finished and saved, but a step of the work after it failed; finish with the commands above" >&2
     verdict ;;
  130) if trained_before_interrupt; then
         # the checkpoints are whole: the run named what finishes the steps left (a resume does them too)
         echo "train.sh: interrupted after training; finish with the commands above" >&2
       else
         echo "train.sh: interrupted; resume with: $(resume_command)" >&2
       fi ;;
  *) echo "train.sh: FAILED with exit code $rc; see $EXP_DIR/logs/train.err" >&2 ;;
esac
exit $rc
