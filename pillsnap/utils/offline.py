"""Keep ultralytics off the network. Used by the data layer (YOLO loaders), the models and inference alike,
so it lives below all of them rather than next to the detector."""

from __future__ import annotations

import logging
import os

LOGGER = logging.getLogger(__name__)


def ultralytics_offline() -> None:
    """Make ultralytics network-free before (and after) it is imported: no hub, no events, no settings sync."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.utils import LOGGER as YOLO_LOGGER
    from ultralytics.utils import SETTINGS

    # Its INFO chatter ("Overriding model.yaml nc=80 ...") would drown our progress lines; warnings still show,
    # and everything does at --log-level DEBUG.
    debug = os.environ.get("PILLSNAP_LOG_LEVEL", "").upper() == "DEBUG"
    YOLO_LOGGER.setLevel(logging.DEBUG if debug else logging.WARNING)
    if SETTINGS.get("sync"):
        try:
            SETTINGS.update(sync=False)
        except OSError as err:  # a read-only settings dir must not stop training; YOLO_OFFLINE already blocks sync
            LOGGER.debug("cannot persist ultralytics sync=False: %s", err)
