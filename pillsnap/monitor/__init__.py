"""Live monitoring of training runs (metrics stream, dashboard).

Names resolve lazily (PEP 562), like the other packages the `pillsnap` command line reaches, so that
`pillsnap --help` imports only the command modules.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "Chunk": "pillsnap.monitor.stream",
    "LiveRun": "pillsnap.monitor.live",
    "MonitorState": "pillsnap.monitor.state",
    "StreamFollower": "pillsnap.monitor.stream",
    "SystemProbe": "pillsnap.monitor.system",
    "create_dashboard": "pillsnap.monitor.dashboard",
    "read_new_records": "pillsnap.monitor.stream",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
