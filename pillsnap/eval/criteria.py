"""What each stage must show, kept as data in one place: the Go/No-Go thresholds, the mandatory checks and the
performance targets of stages 1-4 (the design's values, written with PillSnap's metric paths; docs/DESIGN_MAP.md
gives the design's spelling of each)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A performance target: `path` ("section.key" in the results) against `threshold`."""

    path: str
    threshold: float
    higher_is_better: bool = True
    quality: bool = False  # a model-quality figure: one far below target caps the recommendation

    def ratio(self, value: float) -> float:
        """Achievement in [0, 1]: 1 when met, the share of the target otherwise."""
        if self.higher_is_better:
            return 1.0 if value >= self.threshold else max(value, 0.0) / self.threshold
        return 1.0 if value <= self.threshold else self.threshold / max(value, 1e-12)

    def describe(self, value: float) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.path} {value:.4g} (target {sign} {self.threshold:g})"


@dataclass(frozen=True)
class StageCriteria:
    """The simple gate's thresholds plus the stage's mandatory checks and performance targets."""

    min_accuracy: float
    max_latency_ms: float
    min_coverage: float
    min_eval_samples: int
    max_acc_drop: float
    epsilon_acc: float
    mandatory_checks: tuple[str, ...]
    targets: tuple[Target, ...]


def _quality(path: str, threshold: float) -> Target:
    return Target(path, threshold, quality=True)


def _at_most(path: str, threshold: float) -> Target:
    return Target(path, threshold, higher_is_better=False)


STAGES: dict[int, StageCriteria] = {
    1: StageCriteria(
        0.78, 220, 0.20, 2000, 0.02, 0.002,
        ("pipeline_complete", "detection_model_loading", "classification_model_loading", "onnx_conversion_success"),
        (_quality("detection.mAP@0.5", 0.30), _at_most("detection.inference_time_ms", 50),
         _quality("classification.acc", 0.40), _at_most("classification.inference_time_ms", 10),
         _at_most("system.gpu_memory_gb", 14), _at_most("system.data_loading_s", 2))),
    2: StageCriteria(
        0.82, 220, 0.40, 5000, 0.02, 0.002,
        ("auto_batch_tuning_success", "tensorboard_logging", "class_balance_verification",
         "memory_optimization_working"),
        (_quality("detection.mAP@0.5", 0.50), _quality("detection.mAP@0.5:0.95", 0.35),
         _quality("detection.precision", 0.45), _quality("detection.recall", 0.40),
         _quality("classification.acc", 0.60), _quality("classification.macro_f1", 0.55),
         _quality("classification.top5", 0.80), Target("optimization.batch_size_achieved", 8),
         Target("optimization.throughput_img_s", 100))),
    3: StageCriteria(
        0.85, 200, 0.70, 10000, 0.01, 0.002,
        ("scalability_test_pass", "multi_batch_processing", "memory_leak_test", "stability_test_pass"),
        (_quality("detection.mAP@0.5", 0.70), _quality("detection.mAP@0.5:0.95", 0.50),
         _quality("detection.recall", 0.75), _quality("detection.precision", 0.70),
         _quality("classification.acc", 0.75), _quality("classification.macro_f1", 0.70),
         _quality("classification.top5", 0.90), _quality("classification.per_class_min_f1", 0.30),
         Target("scalability.multi_batch_size", 32), Target("scalability.memory_stable_hours", 12),
         _at_most("scalability.api_response_time_ms", 100))),
    4: StageCriteria(
        0.85, 200, 0.70, 10000, 0.01, 0.002,
        ("full_dataset_processing", "production_api_deployment", "cloudflare_tunnel_setup", "automated_monitoring"),
        (_quality("detection.mAP@0.5", 0.85), _quality("detection.mAP@0.5:0.95", 0.65),
         _quality("detection.recall", 0.90), _quality("detection.precision", 0.85),
         _quality("classification.acc", 0.92), _quality("classification.macro_f1", 0.88),
         _quality("classification.top5", 0.98), _quality("classification.per_class_min_acc", 0.85),
         _at_most("production.inference_latency_ms", 30), Target("production.throughput_img_s", 200),
         Target("production.api_uptime", 0.999))),
}

# Checks that a training run cannot verify (they concern a deployment): reported as unverified, never as passed.
EXTERNAL_CHECKS = frozenset({"production_api_deployment", "cloudflare_tunnel_setup", "automated_monitoring"})

# Mandatory checks of a time-capped stage 1 that still counts as a success (the design's time-cap rule).
TIME_CAP_CHECKS = ("pipeline_complete", "classification_model_loading")


def stage_criteria(stage: int) -> StageCriteria:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage}; expected one of {sorted(STAGES)}")
    return STAGES[stage]
