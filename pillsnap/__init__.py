"""PillSnap: pill recognition from photos (single-pill classifier + multi-pill detector)."""

__version__ = "0.1.0"
