"""HTTP serving of predictions: app.py (routes), guards.py (auth, body limits, request ids), service.py (the model
side), runner.py (the worker pool), and the web page (page.html) and offline docs (docs.py).

`create_app` resolves lazily (PEP 562): `pillsnap.serve.cli` sits under this package, and `pillsnap --help`
must not import FastAPI just to list the serve command.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "create_app": "pillsnap.serve.app",
    "PredictionService": "pillsnap.serve.service",
    "ServeSettings": "pillsnap.serve.settings",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
