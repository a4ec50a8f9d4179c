"""`pillsnap serve`: the prediction API and web page over a trained experiment (checkpoints under --exp).

The API key comes from $PILLSNAP_API_KEY (or that line in .env) or the file named by serving.api_key_file; there
is deliberately no command-line option for it, since `ps` shows every argument.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="HTTP prediction API and web page", description=__doc__)
    parser.add_argument("--exp", default=None, help="experiment directory (default: paths.exp_dir of the config)")
    parser.add_argument("--cfg", default=None, help="config file (serving.* and inference.* keys; default: "
                        "EXP/config.yaml with --exp, else ./config.yaml)")
    parser.add_argument("--host", default=None, help="bind address (default: serving.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serving.port)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run)


def build_service(exp_dir: Path, cfg: Any, device: str | None = None) -> Any:
    """The model side for `exp_dir`: a PredictionService that loads a Predictor when set up."""
    from pillsnap.infer.hard_cases import upload_store
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.serve.service import PredictionService
    from pillsnap.serve.settings import ServeSettings

    settings = ServeSettings.from_config(cfg.serving)
    uploads = upload_store(exp_dir, cfg.inference.hard_cases)  # None when hard cases are off
    return PredictionService(lambda: Predictor(exp_dir, cfg, device), settings.image_limits, uploads)


def warn_without_key(host: str, port: int) -> None:
    banner = "!" * 78
    LOGGER.warning("%s\nNO API KEY: anyone who can reach http://%s:%d can use this API. Set PILLSNAP_API_KEY "
                   "(environment or .env) or serving.api_key_file.\n%s", banner, host, port, banner)


def port_in_use(host: str, port: int) -> str | None:
    """Why `host`:`port` cannot be listened on (taken, or not an address of this machine), None when it can."""
    import socket

    try:  # "" is every interface, as uvicorn takes it
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return f"unknown host ({err})"
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing socket is no bar
            if family == socket.AF_INET6:  # as asyncio's server binds IPv6: an IPv4 listener is no bar
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
    except OSError as err:  # taken, or an address family this machine lacks
        return err.strerror or str(err)
    return None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pillsnap.config import load_cli_config
    from pillsnap.infer.artefacts import find_checkpoints
    from pillsnap.serve.app import create_app
    from pillsnap.serve.auth import resolve_api_key
    from pillsnap.serve.limits import uvicorn_limits
    from pillsnap.serve.settings import ServeSettings

    cfg = load_cli_config(args.exp, args.cfg, args.overrides, dotenv_path=".env")
    exp_dir = Path(cfg.paths.exp_dir)
    find_checkpoints(exp_dir)  # fail now, not in the background, when there is nothing to serve
    settings = ServeSettings.from_config(cfg.serving)
    api_key = resolve_api_key(cfg.serving)
    host, port = args.host or cfg.serving.host, args.port or cfg.serving.port
    busy = port_in_use(host, port)  # said before the models load and the address is announced
    if busy is not None:
        LOGGER.error("serve: cannot listen on %s:%d: %s (another server there? choose another with --port)", host,
                     port, busy)
        return 2
    if api_key is None:
        warn_without_key(host, port)
    app = create_app(build_service(exp_dir, cfg, args.device), settings, api_key)
    LOGGER.info("PillSnap on http://%s:%d (page /, docs /docs; auth %s; %d worker(s), queue %d; backend %s)", host,
                port, "X-API-Key" if api_key else "OFF", settings.workers, settings.max_queue, cfg.inference.backend)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=10,
                **uvicorn_limits(settings))
    return 0
