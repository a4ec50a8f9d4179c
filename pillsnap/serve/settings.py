"""What the HTTP layer enforces, read once from the `serving` section of the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pillsnap.infer.enrol import MAX_PHOTOS, MIN_PHOTOS  # the photos an enrolment takes
from pillsnap.utils.images import ImageLimits

LOGGER = logging.getLogger(__name__)
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file bytes


@dataclass(frozen=True)
class ServeSettings:
    """Limits and pool sizes of the API (see the `serving` keys of config.yaml)."""

    max_upload_mb: float = 10
    max_batch_files: int = 8
    upload_timeout_s: float = 30.0
    image_limits: ImageLimits = field(default_factory=lambda: ImageLimits(min_side=32))
    workers: int = 1
    max_queue: int = 16
    max_inflight_upload_mb: float = 180
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 512

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_inflight_upload_bytes(self) -> int:
        return int(self.max_inflight_upload_mb * 2**20)

    def body_limit(self, path: str) -> int:
        """Most bytes a request body to `path` may carry: one photo, max_batch_files photos for a batch, or the
        most photos an enrolment takes (as many as the upload budget holds, where it holds fewer)."""
        path = path.rstrip("/")
        if path == "/v1/enrol":
            return min(MAX_PHOTOS * self.max_file_bytes + MULTIPART_SLACK, self.max_inflight_upload_bytes)
        files = self.max_batch_files if path.endswith("/batch") else 1
        return files * self.max_file_bytes + MULTIPART_SLACK

    @classmethod
    def from_config(cls, serving: Any) -> ServeSettings:
        limits = ImageLimits(max_pixels=int(serving.max_image_pixels), min_side=int(serving.min_image_side))
        settings = cls(max_upload_mb=float(serving.max_upload_mb), max_batch_files=int(serving.max_batch_files),
                       upload_timeout_s=float(serving.upload_timeout_s), image_limits=limits,
                       workers=int(serving.workers), max_queue=int(serving.max_queue),
                       max_inflight_upload_mb=float(serving.max_inflight_upload_mb),
                       header_timeout_s=float(serving.header_timeout_s), keep_alive_s=int(serving.keep_alive_s),
                       max_connections=int(serving.max_connections))
        settings.check()
        return settings

    def check(self) -> None:
        from pillsnap.config import ConfigError

        if self.workers < 1 or self.max_queue < self.workers:
            raise ConfigError(f"serving.workers must be >= 1 and serving.max_queue >= serving.workers, got "
                              f"workers={self.workers}, max_queue={self.max_queue}")
        if self.max_upload_mb <= 0 or self.upload_timeout_s <= 0 or self.max_batch_files < 1:
            raise ConfigError("serving.max_upload_mb, serving.upload_timeout_s and serving.max_batch_files must be "
                              "positive")
        if min(self.header_timeout_s, self.keep_alive_s, self.max_connections) <= 0:
            raise ConfigError("serving.header_timeout_s, serving.keep_alive_s and serving.max_connections must be "
                              "positive")
        batch = self.body_limit("/v1/predict/batch")
        if self.max_inflight_upload_bytes < batch:  # else a full batch could never be accepted
            raise ConfigError(f"serving.max_inflight_upload_mb ({self.max_inflight_upload_mb:g}) must hold one full "
                              f"batch: at least {batch / 2**20:.1f} (max_batch_files x max_upload_mb + slack)")
        fewest = MIN_PHOTOS * self.max_file_bytes + MULTIPART_SLACK
        if self.body_limit("/v1/enrol") < fewest:
            LOGGER.warning("serving.max_inflight_upload_mb (%g) holds fewer than the %d photos of max_upload_mb (%g) "
                           "an enrolment needs: enrolments of full-size photos get 413; raise it to at least %.1f",
                           self.max_inflight_upload_mb, MIN_PHOTOS, self.max_upload_mb, fewest / 2**20)
