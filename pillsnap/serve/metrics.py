"""Prometheus metrics of one app (its own registry, so that several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """Request counts by route and status, latency histograms, requests in flight, the prediction queue."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("pillsnap_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=reg)
        self.latency = Histogram("pillsnap_http_request_duration_seconds", "Time from request to last byte, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.in_flight = Gauge("pillsnap_http_requests_in_flight", "HTTP requests being handled", registry=reg)
        self.queue = Gauge("pillsnap_inference_jobs", "Prediction jobs running or waiting for a worker", registry=reg)
        self.inference = Histogram("pillsnap_inference_duration_seconds", "Decode + predict time in a worker",
                                   ["endpoint"], buckets=LATENCY_BUCKETS, registry=reg)
        self.predictions = Counter("pillsnap_predictions", "Photos answered, by the path the pipeline took",
                                   ["mode_used"], registry=reg)
        self.cancelled = Counter("pillsnap_inference_cancelled", "Prediction jobs dropped because the client left "
                                 "before a worker took them", ["endpoint"], registry=reg)
        self.upload_bytes = Gauge("pillsnap_upload_bytes_in_flight", "Request body bytes held against "
                                  "serving.max_inflight_upload_mb", registry=reg)
        self.budget_refusals = Counter("pillsnap_upload_budget_refusals", "Requests refused with 503 because the "
                                       "upload byte budget was taken", registry=reg)
        self.ready = Gauge("pillsnap_models_ready", "1 once the models are loaded and warmed up", registry=reg)

    def render(self) -> tuple[bytes, str]:
        """(exposition text, its content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
