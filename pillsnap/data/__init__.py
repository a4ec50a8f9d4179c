"""Data layer: AI Hub format, synthetic generator, ingestion, stages/splits, datasets and loaders.

Public names are re-exported lazily (PEP 562) so that `import pillsnap.data.cli` (and `pillsnap --help`)
does not pay for torch/ultralytics imports.
"""

from __future__ import annotations

from pillsnap._lazy import lazy_exports

_EXPORTS = {
    "generate_dataset": "pillsnap.data.synth",
    "scan_dataset": "pillsnap.data.scan",
    "load_manifest": "pillsnap.data.scan",
    "load_class_map": "pillsnap.data.scan",
    "select_stage": "pillsnap.data.stages",
    "stage_classes": "pillsnap.data.stages",
    "read_image": "pillsnap.utils.images",  # image I/O lives in utils; kept here as the documented name
    "decode_image": "pillsnap.utils.images",
    "crop_box": "pillsnap.data.datasets",
    "classification_transform": "pillsnap.data.datasets",
    "safe_collate": "pillsnap.data.datasets",
    "compute_class_weights": "pillsnap.data.datasets",
    "ClassificationDataset": "pillsnap.data.datasets",
    "build_dataloaders_twostage": "pillsnap.data.loaders",
    "Loaders": "pillsnap.data.loaders",
    "autotune_num_workers": "pillsnap.data.loaders",
    "export_yolo": "pillsnap.data.yolo",
    "build_detection_loader": "pillsnap.data.yolo",
    "build_cache": "pillsnap.data.cache",
    "CachedCrops": "pillsnap.data.cache",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
