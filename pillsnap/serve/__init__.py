"""HTTP serving of predictions.

`create_app` resolves lazily (PEP 562): `pillsnap.serve.cli` sits under this package, and `pillsnap --help`
must not import FastAPI just to list the serve command.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "create_app": "pillsnap.serve.app",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
