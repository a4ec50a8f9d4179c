"""`pillsnap serve`: the prediction API over a trained experiment (checkpoints under --exp)."""

from __future__ import annotations

import argparse
import logging

LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="HTTP prediction API", description=__doc__)
    parser.add_argument("--exp", default=None, help="experiment directory (default: paths.exp_dir of the config)")
    parser.add_argument("--cfg", default="config.yaml", help="config file (serving.* keys; .env fills serving.api_key)")
    parser.add_argument("--host", default=None, help="bind address (default: serving.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serving.port)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pillsnap.config import load_config
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.serve.app import create_app

    cfg = load_config(args.cfg, args.overrides)
    predictor = Predictor(args.exp or cfg.paths.exp_dir, cfg)
    app = create_app(lambda image, mode: predictor.predict(image, mode), api_key=cfg.serving.api_key,
                     max_upload_mb=cfg.serving.max_upload_mb)
    host, port = args.host or cfg.serving.host, args.port or cfg.serving.port
    LOGGER.info("PillSnap API on http://%s:%d (auth: %s)", host, port, "X-API-Key" if cfg.serving.api_key else "off")
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
