"""HTTP serving of predictions."""

from pillsnap.serve.app import create_app

__all__ = ["create_app"]
