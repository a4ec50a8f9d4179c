"""Live monitoring of training runs (metrics stream, dashboard)."""

from pillsnap.monitor.stream import MetricsFollower, read_new_records, summarize

__all__ = ["MetricsFollower", "read_new_records", "summarize"]
