"""The Stage 3 scripts run with the project's interpreter: started with another (`python scripts/stage3/...` outside
the venv, or `./script.py` through /usr/bin/env python3), they start again under `.venv/bin/python`, or say in one
line how to get one, instead of a ModuleNotFoundError traceback."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def use_project_python() -> None:
    """Return when pillsnap can be imported; else run this script again under the project's venv, or exit 2."""
    if importlib.util.find_spec("pillsnap") is not None:
        return
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.is_file() and Path(sys.executable).absolute() != venv.absolute():
        os.execv(str(venv), [str(venv), sys.argv[0], *sys.argv[1:]])
    print(f"{Path(sys.argv[0]).name}: pillsnap is not installed for {sys.executable}: set up the project first "
          f"(bash {ROOT / 'scripts' / 'setup_venv.sh'}) or run it with {venv}", file=sys.stderr)
    sys.exit(2)
