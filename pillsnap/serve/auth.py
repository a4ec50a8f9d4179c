"""The API key: where it comes from (environment, .env, a key file; never the command line) and how it is checked
(as a string, in constant time, from the request headers alone, before any of the body is read)."""

from __future__ import annotations

import hmac
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)
API_KEY_ENV = "PILLSNAP_API_KEY"
KEY_HEADER = "x-api-key"


def _config_error(message: str) -> Exception:
    from pillsnap.config import ConfigError

    return ConfigError(message)


def read_key_file(path: str | Path) -> str:
    """The key in a file (its first line, surrounding whitespace dropped). Warns when others may read it."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise _config_error(f"serving.api_key_file {path} cannot be read ({err.strerror}); create it with the key "
                            f"on one line, or set {API_KEY_ENV} instead") from err
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise _config_error(f"serving.api_key_file {path} is empty: put the key on its first line")
    if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        LOGGER.warning("serving.api_key_file %s is readable by other users; chmod 600 it", path)
    return key


def resolve_api_key(serving: Any, environ: Mapping[str, str] | None = None,
                    dotenv_path: str | Path | None = ".env") -> str | None:
    """The API key, or None for no auth. Order: ${PILLSNAP_API_KEY}, the same line in .env,
    serving.api_key_file, then the legacy serving.api_key (filled from .env PILLSNAP_SERVING_API_KEY)."""
    from pillsnap.config.loader import read_dotenv

    environ = os.environ if environ is None else environ
    dotenv = read_dotenv(dotenv_path) if dotenv_path is not None else {}
    for source, value in (("environment", environ.get(API_KEY_ENV)), (".env", dotenv.get(API_KEY_ENV))):
        if value:
            LOGGER.debug("API key from %s %s", API_KEY_ENV, source)
            return str(value)
    if serving.get("api_key_file"):
        return read_key_file(serving.api_key_file)
    legacy = serving.get("api_key")
    if legacy is None or legacy == "":
        return None
    if not isinstance(legacy, str):
        # YAML and dotted overrides read 123456 as a number (and 007 as 7): such a key could never match.
        raise _config_error(f"serving.api_key must be a string, got the {type(legacy).__name__} {legacy!r}; put the "
                            f"key in {API_KEY_ENV} (environment or .env) or in a file named by serving.api_key_file")
    return legacy


class KeyChecker:
    """Compares a presented key with the expected one in constant time; no expected key means no auth."""

    def __init__(self, expected: str | None) -> None:
        self._expected = expected.encode("utf-8") if expected else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def presented(self, headers: Mapping[str, str]) -> str | None:
        """The key a request carries: X-API-Key, or an `Authorization: Bearer` token."""
        if headers.get(KEY_HEADER):
            return headers[KEY_HEADER]
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def allows(self, headers: Mapping[str, str]) -> bool:
        if self._expected is None:
            return True
        given = self.presented(headers)
        # compare_digest takes the same time wherever the first differing byte is, so timing reveals nothing.
        return given is not None and hmac.compare_digest(given.encode("utf-8"), self._expected)
