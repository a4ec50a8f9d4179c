#!/usr/bin/env bash
# Create .venv (if missing) and install PillSnap with its dev tools. Safe to re-run.
# Usage: bash scripts/setup_venv.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

case "${1:-}" in
  -h|--help)
    cat <<'EOF'
Usage: bash scripts/setup_venv.sh
Creates .venv at the repository root (if missing) and installs PillSnap editable with its dev tools
(pip install -e .[dev]; torch and torchvision are pinned in pyproject.toml). Safe to re-run: an existing
.venv is reused. Takes no options; PYTHON=python3.11 chooses the interpreter.
EOF
    exit 0 ;;
  "") ;;
  *) echo "setup_venv: ERROR: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"

fail() { echo "setup_venv: ERROR: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || fail "'$PYTHON' not found; install Python 3.10+ or set PYTHON=..."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python 3.10+ required, found $("$PYTHON" -V 2>&1)"

if [ -x "$VENV/bin/python" ]; then
  echo "setup_venv: reusing $VENV"
else
  echo "setup_venv: creating $VENV with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV" || fail "python -m venv failed (on Debian: apt install python3-venv)"
fi

# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1); pip takes them from the local disk index.
echo "setup_venv: installing pillsnap[dev] (editable); first run takes a few minutes for torch"
"$VENV/bin/python" -m pip install --quiet --upgrade pip || fail "pip upgrade failed"
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]" || fail "pip install -e .[dev] failed (see pip output above)"

"$VENV/bin/python" - <<'PY' || fail "installed packages do not import"
import torch, torchvision, timm, ultralytics, omegaconf
print(f"setup_venv: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"ultralytics {ultralytics.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
echo "setup_venv: done. Activate with: source .venv/bin/activate"
