"""Model builders: the timm classifier and the ultralytics detector (ultralytics is imported lazily inside)."""

from pillsnap.models.classifier import build_classification_model, load_classifier_for_inference
from pillsnap.models.detector import build_yolo_model, load_detector_for_inference

__all__ = ["build_classification_model", "build_yolo_model", "load_classifier_for_inference",
           "load_detector_for_inference"]
