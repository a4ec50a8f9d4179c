#!/usr/bin/env bash
# The design's path to the set-up script: runs scripts/setup_venv.sh, which creates .venv at the repository root
# (from any working directory) and installs PillSnap with its dev tools. Safe to re-run.
# Usage: bash scripts/core/setup_venv.sh      (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/setup_venv.sh" "$@"
