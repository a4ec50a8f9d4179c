"""Keep ultralytics off the network, and tell quickly whether pretrained weights can be fetched. Used by the data
layer (YOLO loaders), the models and inference alike, so it lives below all of them rather than next to them."""

from __future__ import annotations

import functools
import logging
import os
import threading

LOGGER = logging.getLogger(__name__)
# What a built model's starting weights were, as an attribute of the model (a task keeps it in its checkpoints and
# metrics.json in system.init_weights); the text starts with RANDOM_UNWANTED where pretrained weights were asked for
# and could not be had, which the stage evaluation's advice names before anything else.
WEIGHTS_ORIGIN = "pillsnap_weights"
RANDOM_UNWANTED = "random: "


def mark_weights(model: object, origin: str) -> None:
    """Record where `model`'s starting weights came from (WEIGHTS_ORIGIN)."""
    setattr(model, WEIGHTS_ORIGIN, origin)


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


# How long a pretrained-weights download may wait for its server before training starts from random weights:
# an offline machine must not hang on connection timeouts (huggingface_hub waits 10 s a try, ultralytics 30 s).
REACH_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on", "y", "t")


def hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE=1 (huggingface_hub's own switch) keeps both weight loaders off the network."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    import huggingface_hub.constants as hub

    return bool(hub.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=16)
def reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether `url`'s server answers an HTTP HEAD within `timeout` seconds (any status counts; proxies from the
    environment apply). Asked once per process and URL. A thread bounds the wait, DNS included."""
    import urllib.error
    import urllib.request

    answer: list[bool] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:  # a status line came back: the server is there
            answer.append(True)
        except (OSError, ValueError):  # URLError, refused, timed out, no DNS, bad URL
            answer.append(False)

    thread = threading.Thread(target=ask, daemon=True, name="pillsnap-reachable")
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


def offline_reason(url: str) -> str | None:
    """Why weights from `url` cannot be fetched now (None when they can be tried)."""
    if hub_offline_requested():
        return "offline: HF_HUB_OFFLINE is set"
    if not reachable(url):
        return f"offline: {url} did not answer within {REACH_TIMEOUT_S:g} s"
    return None
